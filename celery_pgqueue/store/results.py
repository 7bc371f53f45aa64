"""Statements for the result backend on ``jobs`` and ``job_logs``: state, attempts, results.

Celery's state lives in the job's own row: ``jobs.status`` for what the tier needs
(queued, running, completed...), ``jobs.result`` for Celery's meta (its state name,
return value or exception type and message, children). With the pgqueue broker the
transport made the row and opened the attempt, and writes go through
:func:`celery_pgqueue.store.jobs.finish`, fenced by the delivery's attempt. With any
other broker there is no row until the backend writes one: :func:`upsert_state`
creates it and opens/closes the attempt's log row itself, in the same statement.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert

from celery_pgqueue.states import FINISHED, JobStatus, LogStatus
from celery_pgqueue.storable import printable
from celery_pgqueue.store.expressions import SECOND, status_literal
from celery_pgqueue.store.result_reads import StoredResult as StoredResult
from celery_pgqueue.store.tables import TZ, job_logs, job_queues, jobs

MAX_ERROR = 255  # jobs.last_error_message is varchar(255)


@dataclass(frozen=True, slots=True)
class StateWrite:
    """One Celery state transition of one task, as the backend asks for it."""

    job_id: UUID
    status: JobStatus
    """The ``jobs.status`` the Celery state implies."""
    log_status: LogStatus | None
    """How the attempt's log row is closed; None leaves it open (STARTED, custom states)."""
    document: Any
    """``jobs.result``: Celery's meta as a JSON value (already validated and size-checked)."""
    ready: bool
    """A ready state (SUCCESS, FAILURE, REVOKED): waiting clients are notified."""
    attempt: int | None
    """The attempt this write belongs to; None when no attempt ran (revoke, chord error)."""
    transport_owned: bool
    """The pgqueue transport made the row and opened the attempt (fence on ``attempt``)."""
    queue_name: str
    """Queue for a row the backend creates (broker other than pgqueue)."""
    error_message: str | None = None
    log_message: str | None = None
    max_attempts: int | None = None
    retry_in: float | None = None
    """RETRY: seconds until the next attempt (ignored when ``retry_at`` is given)."""
    retry_at: datetime | None = None
    """RETRY: when the next attempt is due."""
    started_ago: float | None = None
    """Seconds since this attempt began, if the backend saw it (another broker, no
    STARTED): a duration on the worker's monotonic clock, so the stored start is the
    database's now() minus it, whatever the worker's wall clock says."""


def _param(name: str, type_: Any) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=type_)


JOB_ID = _param("p_job_id", PG_UUID(as_uuid=True))


ATTEMPT = _param("p_attempt", sa.Integer)


STARTED_AT = sa.func.now() - sa.func.coalesce(_param("p_started_ago", sa.Float), 0) * SECOND


def upsert_state(conn: sa.Connection, *, write: StateWrite, channel: str | None) -> bool:
    """Create or update a task's row and its attempt's log row in one statement.

    For brokers other than pgqueue, where no row exists until the backend writes one.
    A completed job is never overwritten (Celery's rule), and a write of an older
    attempt never overwrites a newer one: a retry re-published with countdown=0 can
    start on another worker before this one stores RETRY. The attempt's log row is
    opened (STARTED, custom states) or closed (ready states, RETRY) regardless, because
    it records what that attempt did. ``channel`` set and the state ready: the waiting
    clients are notified at commit.
    """
    w = write
    retry = None
    if w.status is JobStatus.QUEUED:
        retry = "at" if w.retry_at is not None else "in" if w.retry_in is not None else None
    stmt = _upsert_statement(
        w.status,
        w.log_status if w.attempt is not None else None,
        w.attempt is not None,
        channel if w.ready else None,
        retry,
    )
    params = {
        "p_job_id": w.job_id,
        "p_queue": w.queue_name,
        "p_attempt": w.attempt or 0,
        "p_max_attempts": w.max_attempts,
        "p_result": w.document,
        # text columns refuse NUL and lone surrogates: such characters become escapes.
        "p_error": printable(w.error_message or "")[:MAX_ERROR] or None,
        "p_log_message": printable(w.log_message) if w.log_message else w.log_message,
        "p_started_ago": w.started_ago,
        "p_retry_in": w.retry_in,
        "p_retry_at": w.retry_at,
    }
    row = conn.execute(stmt, params).first()
    return bool(row and row[0])


@functools.lru_cache(maxsize=128)
def _upsert_statement(
    status: JobStatus,
    log_status: LogStatus | None,
    with_attempt: bool,
    channel: str | None,
    retry: str | None,
) -> sa.Select[Any]:
    """The upsert for one shape of write, built once: only values vary per call."""
    now = sa.func.now()
    queue = _param("p_queue", sa.String)
    default_priority = (
        sa.select(job_queues.c.default_priority).where(job_queues.c.name == queue).scalar_subquery()
    )
    run_at: sa.ColumnElement[Any] | None = None
    if retry == "at":
        run_at = _param("p_retry_at", TZ)
    elif retry == "in":
        run_at = now + _param("p_retry_in", sa.Float) * SECOND
    insert = pg_insert(jobs).values(
        id=JOB_ID,
        queue_name=queue,
        status=status.value,
        priority=sa.func.coalesce(default_priority, 100),
        attempt_count=ATTEMPT,
        max_attempts=_param("p_max_attempts", sa.Integer),
        result=_param("p_result", JSONB),
        run_at=run_at if run_at is not None else now,
        started_at=STARTED_AT if with_attempt else None,
        completed_at=now if status is JobStatus.COMPLETED else None,
        failed_at=now if status is JobStatus.FAILED else None,
        last_error_message=_param("p_error", sa.String) if status is JobStatus.FAILED else None,
    )
    new = insert.excluded
    changes: dict[str, Any] = {
        "status": new.status,
        "result": new.result,
        "attempt_count": sa.func.greatest(jobs.c.attempt_count, new.attempt_count),
        "max_attempts": sa.func.coalesce(new.max_attempts, jobs.c.max_attempts),
        "updated_at": now,
    }
    if with_attempt:
        # A new attempt starts the clock again; the same attempt keeps its start.
        changes["started_at"] = sa.case(
            (jobs.c.attempt_count < new.attempt_count, new.started_at),
            else_=sa.func.coalesce(jobs.c.started_at, new.started_at),
        )
    if status is JobStatus.COMPLETED:
        changes["completed_at"] = now
    elif status is JobStatus.FAILED:
        changes.update(failed_at=now, last_error_message=new.last_error_message)
    elif status is JobStatus.QUEUED and run_at is not None:
        changes["run_at"] = new.run_at
    if status in (*FINISHED, JobStatus.QUEUED):
        changes.update(lease_owner=None, lease_expires_at=None)
    fence = [jobs.c.status != status_literal(JobStatus.COMPLETED)]
    if with_attempt:
        fence.append(jobs.c.attempt_count <= ATTEMPT)
    written = (
        insert.on_conflict_do_update(index_elements=["id"], set_=changes, where=sa.and_(*fence))
        .returning(jobs.c.id)
        .cte("written")
    )
    columns: list[sa.ColumnElement[Any]] = [
        sa.select(sa.func.count()).select_from(written).scalar_subquery()
    ]
    if channel is not None:
        columns.append(
            sa.select(sa.func.count(sa.func.pg_notify(channel, sa.cast(written.c.id, sa.Text))))
            .select_from(written)
            .scalar_subquery()
        )
    stmt = sa.select(*columns)
    if with_attempt:
        for cte in _attempt_log(log_status):
            stmt = stmt.add_cte(cte)
    return stmt


def upsert_unrun(
    conn: sa.Connection, *, status: JobStatus, writes: Sequence[StateWrite], channel: str | None
) -> int:
    """Record one state for many tasks that never ran, in one statement; rows written.

    The tasks of a group a failed chain never published: each gets (or keeps) a row
    holding the state, with no attempt and no log row. A completed job is never
    overwritten. ``channel`` set: each row's waiters are notified at commit.
    """
    if not writes:
        return 0
    stmt = _unrun_statement(status, channel is not None)
    params = {
        "p_ids": [w.job_id for w in writes],
        "p_queues": [w.queue_name for w in writes],
        "p_results": [w.document for w in writes],
        "p_errors": [printable(w.error_message or "")[:MAX_ERROR] or None for w in writes],
        "p_max_attempts": [w.max_attempts for w in writes],
        "p_channel": channel,
    }
    row = conn.execute(stmt, params).first()
    return int(row[0]) if row else 0


@functools.lru_cache(maxsize=8)
def _unrun_statement(status: JobStatus, notify: bool) -> sa.Select[Any]:
    now = sa.func.now()
    v: Any = (
        sa.func.unnest(
            sa.bindparam("p_ids", type_=ARRAY(PG_UUID(as_uuid=True))),
            sa.bindparam("p_queues", type_=ARRAY(sa.String)),
            sa.bindparam("p_results", type_=ARRAY(JSONB)),
            sa.bindparam("p_errors", type_=ARRAY(sa.String)),
            sa.bindparam("p_max_attempts", type_=ARRAY(sa.Integer)),
        )
        .table_valued("id", "queue_name", "result", "error", "max_attempts")
        .render_derived(name="v", with_types=False)
    )
    q = job_queues.alias("q")
    failed = status is JobStatus.FAILED
    rows = sa.select(
        v.c.id,
        v.c.queue_name,
        sa.literal(status.value),
        sa.func.coalesce(q.c.default_priority, 100),
        v.c.max_attempts,
        v.c.result,
        now,
        now if status is JobStatus.COMPLETED else sa.null(),
        now if failed else sa.null(),
        v.c.error if failed else sa.null(),
    ).select_from(v.outerjoin(q, q.c.name == v.c.queue_name))
    columns = [
        "id",
        "queue_name",
        "status",
        "priority",
        "max_attempts",
        "result",
        "run_at",
        "completed_at",
        "failed_at",
        "last_error_message",
    ]
    insert = pg_insert(jobs).from_select(columns, rows)
    new = insert.excluded
    changes: dict[str, Any] = {
        "status": new.status,
        "result": new.result,
        "max_attempts": sa.func.coalesce(new.max_attempts, jobs.c.max_attempts),
        "completed_at": new.completed_at,
        "failed_at": new.failed_at,
        "last_error_message": new.last_error_message,
        "updated_at": now,
    }
    if status in FINISHED:
        changes.update(lease_owner=None, lease_expires_at=None)
    written = (
        insert.on_conflict_do_update(
            index_elements=["id"],
            set_=changes,
            where=jobs.c.status != status_literal(JobStatus.COMPLETED),
        )
        .returning(jobs.c.id)
        .cte("written")
    )
    columns_out: list[sa.ColumnElement[Any]] = [
        sa.select(sa.func.count()).select_from(written).scalar_subquery()
    ]
    if notify:
        channel = sa.bindparam("p_channel", type_=sa.String)
        columns_out.append(
            sa.select(sa.func.count(sa.func.pg_notify(channel, sa.cast(written.c.id, sa.Text))))
            .select_from(written)
            .scalar_subquery()
        )
    return sa.select(*columns_out)


def _attempt_log(log_status: LogStatus | None) -> list[sa.CTE]:
    """Open, or close (opening it first if it was never opened), this attempt's log row.

    Written even when the job row was fenced out: a newer attempt that already finished
    must not erase what this one did. The job row exists by the end of the statement
    (inserted by ``written`` or there before), which is when the foreign key is
    checked. Data-modifying CTEs run even when the main query does not read them.
    """
    this_attempt = sa.and_(job_logs.c.job_id == JOB_ID, job_logs.c.attempt_number == ATTEMPT)
    absent = ~sa.exists().where(this_attempt)
    if log_status is None:
        opened = sa.select(
            JOB_ID, ATTEMPT, sa.literal(LogStatus.ATTEMPTING.value), STARTED_AT
        ).where(absent)
        return [
            sa.insert(job_logs)
            .from_select(["job_id", "attempt_number", "status", "started_at"], opened)
            .cte("opened")
        ]
    message = _param("p_log_message", sa.Text)
    closed = (
        sa.update(job_logs)
        .where(this_attempt, job_logs.c.status == LogStatus.ATTEMPTING.value)
        .values(
            status=log_status.value,
            finished_at=sa.func.now(),
            duration=sa.func.now() - job_logs.c.started_at,
            log_message=message,
        )
        .cte("closed")
    )
    # Never opened (no STARTED write): record the whole attempt at once. Both CTEs see
    # the same snapshot, so exactly one of them acts.
    whole = sa.select(
        JOB_ID,
        ATTEMPT,
        sa.literal(log_status.value),
        STARTED_AT,
        sa.func.now(),
        sa.func.now() - STARTED_AT,
        message,
    ).where(absent)
    recorded = (
        sa.insert(job_logs)
        .from_select(
            [
                "job_id",
                "attempt_number",
                "status",
                "started_at",
                "finished_at",
                "duration",
                "log_message",
            ],
            whole,
        )
        .cte("recorded")
    )
    return [closed, recorded]
