"""SQL expressions the statement modules share: one home for each.

The units (``SECOND``), the status tests the partial indexes are declared with, the
per-process constants rendered into the text (:func:`fixed`), and the CTE pieces
several statements on ``jobs`` are built from (NOTIFYs, closing attempts).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import UUID as PG_UUID

from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store.tables import job_logs, jobs


def status_literal(status: JobStatus) -> sa.BindParameter[str]:
    # Rendered into the SQL text, not bound: a generic (prepared) plan can then still
    # match the partial indexes declared WHERE status = '...'.
    return sa.literal(status.value, literal_execute=True)


SECOND = sa.text("interval '1 second'")

IS_QUEUED = jobs.c.status == status_literal(JobStatus.QUEUED)

IS_RUNNING = jobs.c.status == status_literal(JobStatus.RUNNING)


def fixed(value: float) -> sa.BindParameter[Any]:
    """A per-process constant (a retention, a batch size) rendered into the SQL text.

    As a bound parameter, a generic plan can't see it: ``updated_at < now() - $1``
    is then guessed to match a third of the table, and ``LIMIT $2`` a tenth, and the
    planner picks a sequential scan, which a pass with nothing to delete reads to
    the end. As a literal the planner estimates from the histogram; the SQL text
    stays the same for the life of the process, so it is still prepared once.
    """
    return sa.literal(value, literal_execute=True)


def notify_queues(changed: sa.CTE, notify: bool) -> sa.ColumnElement[Any]:
    """Count of NOTIFYs sent, one per distinct queue in ``changed`` (fired at commit).

    The channel is the bound parameter ``channel``.
    """
    if not notify:
        return sa.literal(0)
    distinct = sa.select(changed.c.queue_name).distinct().subquery("notified")
    channel = sa.bindparam("p_channel", type_=sa.String)
    return (
        sa.select(sa.func.count(sa.func.pg_notify(channel, distinct.c.queue_name)))
        .select_from(distinct)
        .scalar_subquery()
    )


def close_attempts(changed: sa.CTE, status: Any, message: str) -> sa.CTE:
    """Close the open log row of each changed job's current attempt (a CTE)."""
    return (
        sa.update(job_logs)
        .where(
            job_logs.c.job_id == changed.c.id,
            job_logs.c.attempt_number == changed.c.attempt_count,
            job_logs.c.status == LogStatus.ATTEMPTING.value,
        )
        .values(
            status=status,
            finished_at=sa.func.now(),
            duration=sa.func.now() - job_logs.c.started_at,
            log_message=message,
        )
        .cte("closed")
    )


def announce(changed: sa.CTE, result_channel: str | None) -> sa.ColumnElement[Any]:
    """NOTIFY each changed job id on the result backend's channel (woken ``get()``)."""
    if result_channel is None:
        return sa.literal(0)
    return (
        sa.select(sa.func.count(sa.func.pg_notify(result_channel, sa.cast(changed.c.id, sa.Text))))
        .select_from(changed)
        .scalar_subquery()
    )


def ids_param() -> sa.BindParameter[Any]:
    return sa.bindparam("p_ids", type_=ARRAY(PG_UUID(as_uuid=True)))


IS_TASK = sa.or_(
    sa.func.coalesce(jobs.c.payload["headers"].has_key("task"), sa.false()),
    # task_protocol=1 names the task in a JSON body (an object: a protocol 2 body is an
    # array, where ``?`` would test the elements).
    sa.and_(
        sa.func.jsonb_typeof(jobs.c.payload["body"]) == "object",
        sa.func.coalesce(jobs.c.payload["body"].has_key("task"), sa.false()),
    ),
)
"""A Celery task message (protocol 2 headers or a protocol 1 body name the task), not
transient traffic."""

IS_EXPIRED = sa.and_(IS_QUEUED, jobs.c.expires_at.is_not(None), jobs.c.expires_at <= sa.func.now())
"""Still waiting when its TTL (Kombu ``expiration``, Celery ``expires``) ran out."""
