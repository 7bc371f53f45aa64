"""Reading jobs: one job, a search, statuses, queue sizes, the next one due."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from celery_pgqueue.states import JobStatus
from celery_pgqueue.store.expressions import (
    IS_QUEUED,
    SECOND,
    fixed,
    status_literal,
)
from celery_pgqueue.store.listener import EPOCH_MARK, SCHEDULED_MARK
from celery_pgqueue.store.tables import jobs


def count_waiting(conn: sa.Connection, *, queue_name: str) -> int:
    """Queued jobs in a queue, due or not (Kombu's queue size)."""
    return int(
        conn.execute(
            sa.select(sa.func.count()).where(jobs.c.queue_name == queue_name, IS_QUEUED)
        ).scalar_one()
    )


def get(conn: sa.Connection, *, job_id: UUID) -> sa.RowMapping | None:
    """One job row, every column."""
    return conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()


def get_results(conn: sa.Connection, *, job_ids: Sequence[UUID]) -> list[sa.Row[Any]]:
    """``(id, status, result)`` of several jobs in one round trip."""
    return list(
        conn.execute(
            sa.select(jobs.c.id, jobs.c.status, jobs.c.result).where(jobs.c.id.in_(list(job_ids)))
        )
    )


def find(
    conn: sa.Connection,
    *,
    queues: Sequence[str] = (),
    statuses: Sequence[JobStatus] = (),
    task: str | None = None,
    changed_within: float | None = None,
    changed_since: Any = None,
    scheduled: bool = False,
    limit: int,
) -> list[sa.RowMapping]:
    """Jobs matching every given filter, most recently changed first.

    For operators (``pgqueue jobs``): ``changed_within`` is seconds by the database's
    clock, so an operator's skewed laptop clock can't hide recent failures.
    ``scheduled``: only waiting jobs not due yet (countdown, ETA, a retry's delay), by
    the same clock, soonest first: what ``celery inspect scheduled`` lists on brokers
    whose workers hold such tasks in memory.
    """
    stmt = sa.select(jobs)
    if scheduled:
        stmt = stmt.where(IS_QUEUED, jobs.c.run_at > sa.func.now())
    if queues:
        stmt = stmt.where(jobs.c.queue_name.in_(list(queues)))
    if statuses:
        stmt = stmt.where(jobs.c.status.in_([s.value for s in statuses]))
    if task is not None:
        stmt = stmt.where(jobs.c.payload["headers"]["task"].astext == task)
    if changed_within is not None:
        stmt = stmt.where(jobs.c.updated_at >= sa.func.now() - sa.literal(changed_within) * SECOND)
    if changed_since is not None:
        stmt = stmt.where(jobs.c.updated_at >= changed_since)
    if scheduled:
        stmt = stmt.order_by(jobs.c.run_at, jobs.c.priority, jobs.c.id).limit(limit)
    else:
        stmt = stmt.order_by(jobs.c.updated_at.desc(), jobs.c.id).limit(limit)
    return list(conn.execute(stmt).mappings())


def ids_between(conn: sa.Connection, *, low: UUID, high: UUID, limit: int) -> list[UUID]:
    """Job ids in ``[low, high]``: an id prefix as a range the primary key can scan."""
    rows = conn.execute(
        sa.select(jobs.c.id).where(jobs.c.id.between(low, high)).order_by(jobs.c.id).limit(limit)
    ).all()
    return [row[0] for row in rows]


def statuses(conn: sa.Connection, *, job_ids: Sequence[UUID]) -> dict[UUID, str]:
    """The status of each id that exists (absent ids are missing from the result)."""
    if not job_ids:
        return {}
    rows = conn.execute(
        sa.select(jobs.c.id, jobs.c.status).where(jobs.c.id.in_(list(job_ids)))
    ).all()
    return {row[0]: row[1] for row in rows}


# Priority levels a wake-up look-up walks per queue (two index probes each). A queue
# with more distinct priorities is still served: by the poll, at worst.
MAX_PRIORITY_LEVELS = 100


@functools.cache
def _next_due_statement() -> sa.Executable:
    """Per queue asked: seconds until its soonest scheduled job and that job's
    ``run_at`` (NULLs: none), NOTIFYing the answer for the queues in ``p_tell``.

    ``ix_jobs_ready`` orders a queue's rows by priority first, so the soonest
    ``run_at`` is not its first entry: walk the distinct priorities (one probe each,
    a loose index scan in a recursive CTE) and take each level's first future
    ``run_at`` (one more probe), instead of reading every scheduled row.
    """

    def queued(alias: Any) -> sa.ColumnElement[bool]:
        condition: sa.ColumnElement[bool] = alias.c.status == status_literal(JobStatus.QUEUED)
        return condition

    names = (
        sa.func.unnest(sa.bindparam("p_queues", type_=ARRAY(sa.String)))
        .table_valued("name")
        .render_derived(name="q")
    )
    first = jobs.alias("first_level")
    levels = sa.select(
        names.c.name.label("queue_name"),
        sa.select(first.c.priority)
        .where(first.c.queue_name == names.c.name, queued(first))
        .order_by(first.c.priority)
        .limit(fixed(1))
        .scalar_subquery()
        .label("priority"),
        fixed(1).label("depth"),
    ).cte("levels", recursive=True)
    after = jobs.alias("next_level")
    levels = levels.union_all(
        sa.select(
            levels.c.queue_name,
            sa.select(after.c.priority)
            .where(
                after.c.queue_name == levels.c.queue_name,
                queued(after),
                after.c.priority > levels.c.priority,
            )
            .order_by(after.c.priority)
            .limit(fixed(1))
            .scalar_subquery(),
            levels.c.depth + 1,
        ).where(levels.c.priority.is_not(None), levels.c.depth < fixed(MAX_PRIORITY_LEVELS))
    )
    row = jobs.alias("soonest_row")
    soonest = (
        sa.select(row.c.run_at)
        .where(
            row.c.queue_name == levels.c.queue_name,
            queued(row),
            row.c.priority == levels.c.priority,
            row.c.run_at > sa.func.now() - sa.bindparam("p_within", type_=sa.Float) * SECOND,
        )
        .order_by(row.c.run_at)
        .limit(fixed(1))
        .lateral("soonest")
    )
    per_queue = (
        sa.select(
            levels.c.queue_name.label("queue_name"),
            sa.func.min(soonest.c.run_at).label("run_at"),
        )
        .select_from(levels.join(soonest, sa.true()))
        .group_by(levels.c.queue_name)
        .cte("per_queue")
    )
    asked = (
        sa.func.unnest(sa.bindparam("p_queues", type_=ARRAY(sa.String)))
        .table_valued("name")
        .render_derived(name="asked")
    )
    seconds = sa.cast(sa.extract("epoch", per_queue.c.run_at - sa.func.now()), sa.Float)
    run_at = sa.cast(sa.extract("epoch", per_queue.c.run_at), sa.Float)
    # listener.due_payload, for the queues in p_tell: NOTIFYed at the commit.
    note = (
        asked.c.name
        + sa.literal(EPOCH_MARK)
        + sa.func.coalesce(sa.cast(run_at, sa.Text), "")
        + sa.literal(SCHEDULED_MARK)
        + sa.func.coalesce(sa.cast(seconds, sa.Text), "Infinity")
    )
    told = sa.case(
        (
            asked.c.name == sa.any_(sa.bindparam("p_tell", type_=ARRAY(sa.String))),
            sa.func.pg_notify(sa.bindparam("p_channel", type_=sa.Text), note),
        ),
        else_=None,
    )
    return sa.select(asked.c.name, seconds, run_at, told).select_from(
        asked.outerjoin(per_queue, per_queue.c.queue_name == asked.c.name)
    )


def next_due(
    conn: sa.Connection,
    *,
    queue_names: Sequence[str],
    came_due_within: float = 0.0,
    tell: Sequence[str] = (),
    channel: str | None = None,
) -> dict[str, tuple[float, float]]:
    """Per queue of ``queue_names`` with a job that is not due yet: ``{queue: (seconds,
    run_at)}``, the seconds until the soonest comes due and its ``run_at`` (Unix seconds
    on the database's clock).

    ``came_due_within``: jobs that came due at most that many seconds ago count too (a
    negative answer): a claim that ran just before may have missed them. Older due
    jobs never count, so a paused queue's backlog cannot keep a worker spinning.
    Asked of the database, so the answer is on its clock: a worker waits that long on
    its own monotonic clock, whatever its wall clock says. The queues in ``tell`` get
    the answer NOTIFYed on ``channel`` too (``listener.due_payload``, "none scheduled"
    included), so their other workers need not ask (see transport/herd.py).
    """
    if not queue_names:
        return {}
    params = {
        "p_queues": list(queue_names),
        "p_within": max(0.0, came_due_within),
        "p_tell": list(tell) if channel else [],
        "p_channel": channel,
    }
    rows = conn.execute(_next_due_statement(), params).all()
    return {
        name: (float(seconds), float(at)) for name, seconds, at, _ in rows if seconds is not None
    }
