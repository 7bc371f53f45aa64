"""Statements behind the Prometheus metrics: live queue state and monotonic counters.

A scrape is two statements. :func:`queue_state` reads only ``queued`` and ``running``
rows, through the partial indexes ``ix_jobs_ready`` (index-only) and ``ix_jobs_running``
(or ``ix_jobs_lease``), so its cost follows the backlog, not the table: counting
finished rows by queue would read every retained row (0.8 s at a million).
:func:`counters` reads ``job_counters``.

Finished jobs are counted by :func:`fold_finished`, which maintenance runs every pass:
it adds the jobs that reached ``completed``, ``failed`` or ``cancelled`` between the
``mark`` row's ``counted_until`` and ``now() - FOLD_LAG`` to per-queue totals and moves
the mark. A job is counted once, when its final ``updated_at`` falls behind the mark,
whatever retention or ``forget()`` does to its row afterwards, so the totals only grow
(what a Prometheus counter must do). The lag leaves time for the transaction that
finished a job to commit before its window is counted; a job deleted within the lag
of finishing (``forget()`` at once) is never counted. Transient queues (those with an
expiry: replies, mailboxes) are left out, as in ``pgqueue status``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import INTERVAL
from sqlalchemy.dialects.postgresql import insert as pg_insert

from celery_pgqueue.states import FINISHED as FINISHED_STATUSES
from celery_pgqueue.states import JobStatus
from celery_pgqueue.store.locks import TURN_PREFIX
from celery_pgqueue.store.tables import job_counters, job_queues, jobs

if TYPE_CHECKING:
    from celery_pgqueue.store import Store

#: Seconds a finished job waits before it is counted (its transaction must commit).
FOLD_LAG = 10.0
#: Most time one fold covers, so a long-idle maintenance catches up in bounded steps.
FOLD_WINDOW = 900.0

MARK = "mark"
FINISHED = tuple(status.value for status in FINISHED_STATUSES)
RESCUED_REQUEUED = "lease_rescued_requeued"
RESCUED_FAILED = "lease_rescued_failed"


@dataclass(frozen=True, slots=True)
class QueueState:
    """One work queue as a scrape sees it."""

    name: str
    is_active: bool
    queued: int
    ready: int
    oldest_ready_seconds: float | None
    running: int
    lease_expired: int


@dataclass(frozen=True, slots=True)
class CounterValue:
    """One monotonic total: a finished status per queue, or a rescue outcome."""

    counter: str
    queue_name: str
    value: int


def _interval(seconds: float) -> sa.BindParameter[timedelta]:
    return sa.bindparam(None, timedelta(seconds=seconds), type_=INTERVAL)


def queue_state(conn: sa.Connection) -> list[QueueState]:
    """Per work queue: paused or not, queued / ready / running, oldest ready age.

    Two aggregates over the partial indexes (queued rows, running rows) joined to
    ``job_queues``; "ready" is ``run_at <= now()`` (a waiting message past its TTL
    counts until maintenance drops it, within seconds). 'queued' and 'running' are
    literals so the partial indexes' predicates match under generic plans too.
    """
    queued = (
        sa.select(
            jobs.c.queue_name,
            sa.func.count().label("queued"),
            sa.func.count().filter(jobs.c.run_at <= sa.func.now()).label("ready"),
            sa.func.min(jobs.c.run_at).filter(jobs.c.run_at <= sa.func.now()).label("oldest"),
        )
        .where(jobs.c.status == sa.literal(JobStatus.QUEUED.value, literal_execute=True))
        .group_by(jobs.c.queue_name)
        .subquery("queued")
    )
    running = (
        sa.select(
            jobs.c.queue_name,
            sa.func.count().label("running"),
            sa.func.count().filter(jobs.c.lease_expires_at < sa.func.now()).label("expired"),
        )
        .where(jobs.c.status == sa.literal(JobStatus.RUNNING.value, literal_execute=True))
        .group_by(jobs.c.queue_name)
        .subquery("running")
    )
    q = job_queues
    rows = conn.execute(
        sa.select(
            q.c.name,
            q.c.is_active,
            sa.func.coalesce(queued.c.queued, 0),
            sa.func.coalesce(queued.c.ready, 0),
            sa.cast(sa.extract("epoch", sa.func.now() - queued.c.oldest), sa.Float),
            sa.func.coalesce(running.c.running, 0),
            sa.func.coalesce(running.c.expired, 0),
        )
        .select_from(
            q.outerjoin(queued, queued.c.queue_name == q.c.name).outerjoin(
                running, running.c.queue_name == q.c.name
            )
        )
        .where(q.c.expires_at.is_(None))
        .order_by(q.c.name)
    )
    return [QueueState(*row) for row in rows]


def counters(conn: sa.Connection) -> list[CounterValue]:
    """Every total in ``job_counters`` (not the mark, nor the turn rows of locks.py)."""
    c = job_counters
    rows = conn.execute(
        sa.select(c.c.counter, c.c.queue_name, c.c.value)
        .where(c.c.counter != MARK, ~c.c.counter.startswith(TURN_PREFIX, autoescape=True))
        .order_by(c.c.counter, c.c.queue_name)
    )
    return [CounterValue(*row) for row in rows]


def fold_finished(conn: sa.Connection, *, lag: float, window: float) -> int:
    """Add jobs finished since the mark (up to ``lag`` seconds ago) to the totals.

    One statement: the mark row is locked, the window's finished jobs of work queues
    are counted per queue and status through ``ix_jobs_finished`` (status,
    updated_at), added to ``job_counters``, and the mark moved to the window's end.
    A mark someone deleted is made again, at now: counting restarts there. Returns
    how many jobs were counted.
    """
    c = job_counters
    remade = (
        pg_insert(c)
        .values(counter=MARK, queue_name="", value=0, counted_until=sa.func.now())
        .on_conflict_do_nothing(index_elements=[c.c.counter, c.c.queue_name])
        .returning(c.c.counter)
        .cte("remade")
    )
    mark = (
        sa.select(c.c.counted_until.label("since"))
        .where(c.c.counter == MARK, c.c.queue_name == "")
        .with_for_update()
        .cte("mark")
    )
    bounds = sa.select(
        mark.c.since,
        sa.func.least(sa.func.now() - _interval(lag), mark.c.since + _interval(window)).label(
            "until"
        ),
    ).cte("bounds")
    finished = (
        sa.select(jobs.c.queue_name, jobs.c.status, sa.func.count().label("n"))
        .select_from(
            jobs.join(
                job_queues,
                sa.and_(job_queues.c.name == jobs.c.queue_name, job_queues.c.expires_at.is_(None)),
            ).join(bounds, sa.true())
        )
        .where(
            jobs.c.status.in_([sa.literal(s, literal_execute=True) for s in FINISHED]),
            jobs.c.updated_at > bounds.c.since,
            jobs.c.updated_at <= bounds.c.until,
        )
        .group_by(jobs.c.queue_name, jobs.c.status)
        .cte("finished")
    )
    insert = pg_insert(c).from_select(
        ["counter", "queue_name", "value"],
        sa.select(finished.c.status, finished.c.queue_name, finished.c.n),
    )
    added = (
        insert.on_conflict_do_update(
            index_elements=[c.c.counter, c.c.queue_name],
            set_={"value": c.c.value + insert.excluded.value, "updated_at": sa.func.now()},
        )
        .returning(c.c.counter)
        .cte("added")
    )
    moved = (
        sa.update(c)
        .where(c.c.counter == MARK, c.c.queue_name == "", c.c.counted_until < bounds.c.until)
        .values(counted_until=bounds.c.until, updated_at=sa.func.now())
        .returning(c.c.counter)
        .cte("moved")
    )
    total = conn.execute(
        sa.select(
            sa.select(sa.func.coalesce(sa.func.sum(finished.c.n), 0)).scalar_subquery(),
            sa.select(sa.func.count()).select_from(added).scalar_subquery(),
            sa.select(sa.func.count()).select_from(moved).scalar_subquery(),
            sa.select(sa.func.count()).select_from(remade).scalar_subquery(),
        )
    ).first()
    return int(total[0]) if total else 0


def add(conn: sa.Connection, *, values: dict[tuple[str, str], int]) -> None:
    """Add to totals, ``{(counter, queue_name): amount}`` (zeros skipped)."""
    rows = [
        {"counter": counter, "queue_name": queue, "value": amount}
        for (counter, queue), amount in sorted(values.items())
        if amount
    ]
    if not rows:
        return
    insert = pg_insert(job_counters).values(rows)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["counter", "queue_name"],
            set_={
                "value": job_counters.c.value + insert.excluded.value,
                "updated_at": sa.func.now(),
            },
        )
    )


# -- one transaction per call ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scrape reads."""

    queues: list[QueueState]
    counters: list[CounterValue]


def snapshot(store: Store) -> Snapshot:
    """The two scrape statements, in one short read-only transaction."""
    with store.begin() as conn:
        return Snapshot(queue_state(conn), counters(conn))


def fold(store: Store, *, lag: float = FOLD_LAG, window: float = FOLD_WINDOW) -> int:
    """Count jobs that finished since the last fold (maintenance calls this)."""
    with store.begin() as conn:
        return fold_finished(conn, lag=lag, window=window)


def count_rescues(store: Store, *, requeued: int, failed: int) -> None:
    """Add one maintenance pass's lease rescues to the totals."""
    if not (requeued or failed):
        return
    with store.begin() as conn:
        add(conn, values={(RESCUED_REQUEUED, ""): requeued, (RESCUED_FAILED, ""): failed})
