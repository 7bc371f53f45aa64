"""Statements on ``job_schedules`` and ``job_beat_leases``; the API is in ``schedule.py``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import INTERVAL
from sqlalchemy.dialects.postgresql import insert as pg_insert

from celery_pgqueue.store.beat_records import (
    EntryDefinition,
    EntryState,
    LeaseRow,
    ScheduleRow,
)
from celery_pgqueue.store.tables import job_beat_leases, job_schedules


def _interval(seconds: float) -> sa.BindParameter[timedelta]:
    return sa.bindparam(None, timedelta(seconds=seconds), type_=INTERVAL)


def upsert_entries(
    conn: sa.Connection, *, beat_name: str, entries: Sequence[EntryDefinition]
) -> None:
    """Insert new entries; refresh the definition of existing ones, keeping their state."""
    if not entries:
        return
    insert = pg_insert(job_schedules).values(
        [
            {
                "beat_name": beat_name,
                "name": e.name,
                "task": e.task,
                "schedule": e.schedule,
                "next_run_at": e.next_run_at,
            }
            for e in entries
        ]
    )
    t = job_schedules
    changed = sa.or_(
        t.c.task.is_distinct_from(insert.excluded.task),
        t.c.schedule.is_distinct_from(insert.excluded.schedule),
    )
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=[t.c.beat_name, t.c.name],
            set_={
                "task": insert.excluded.task,
                "schedule": insert.excluded.schedule,
                "updated_at": sa.func.now(),
            },
            # Unchanged rows are not rewritten: every beat syncs at start.
            where=changed,
        )
    )


def delete_others(conn: sa.Connection, *, beat_name: str, keep: Sequence[str]) -> int:
    """Remove the entries of ``beat_name`` that ``beat_schedule`` no longer has."""
    t = job_schedules
    stmt = sa.delete(t).where(t.c.beat_name == beat_name)
    if keep:
        stmt = stmt.where(t.c.name.not_in(list(keep)))
    return conn.execute(stmt).rowcount


def states(conn: sa.Connection, *, beat_name: str) -> list[EntryState]:
    """Every entry's state in one schedule."""
    t = job_schedules
    rows = conn.execute(
        sa.select(t.c.name, t.c.enabled, t.c.last_run_at, t.c.total_run_count, t.c.created_at)
        .where(t.c.beat_name == beat_name)
        .order_by(t.c.name)
    )
    return [EntryState(*row) for row in rows]


def set_next_runs(
    conn: sa.Connection, *, beat_name: str, next_runs: Sequence[tuple[str, datetime | None]]
) -> None:
    """Record the leader's estimate of each entry's next tick (for operators only)."""
    if not next_runs:
        return
    t = job_schedules
    conn.execute(
        sa.update(t)
        .where(t.c.beat_name == beat_name, t.c.name == sa.bindparam("p_name"))
        .values(next_run_at=sa.bindparam("p_next")),
        [{"p_name": name, "p_next": at} for name, at in next_runs],
    )


def acquire(
    conn: sa.Connection, *, beat_name: str, holder: str, ttl: float
) -> tuple[int, datetime] | None:
    """Take or keep the lease: (fence, database clock) if ``holder`` leads now, else None.

    A row held by someone else is taken only once it has expired; taking it over
    increments the fence, keeping one's own does not.
    """
    t = job_beat_leases
    insert = pg_insert(t).values(
        beat_name=beat_name,
        holder=holder,
        fence=1,
        expires_at=sa.func.now() + _interval(ttl),
    )
    mine = t.c.holder == insert.excluded.holder
    row = conn.execute(
        insert.on_conflict_do_update(
            index_elements=[t.c.beat_name],
            set_={
                "holder": insert.excluded.holder,
                "fence": sa.case((mine, t.c.fence), else_=t.c.fence + 1),
                "acquired_at": sa.case((mine, t.c.acquired_at), else_=sa.func.now()),
                "renewed_at": sa.func.now(),
                "expires_at": insert.excluded.expires_at,
            },
            where=sa.or_(mine, t.c.expires_at <= sa.func.now()),
        ).returning(t.c.fence, sa.func.clock_timestamp())
    ).first()
    return (int(row[0]), row[1]) if row else None


def renew(
    conn: sa.Connection, *, beat_name: str, holder: str, fence: int, ttl: float
) -> datetime | None:
    """Extend the lease if holder and fence are still ours; the database clock, or None.

    No check of ``expires_at``: a lapsed lease nobody took is still ours (the fence is
    unchanged), and the row lock this takes makes a concurrent takeover wait for our
    commit and then see the new expiry.
    """
    t = job_beat_leases
    row = conn.execute(
        sa.update(t)
        .where(t.c.beat_name == beat_name, t.c.holder == holder, t.c.fence == fence)
        .values(renewed_at=sa.func.now(), expires_at=sa.func.now() + _interval(ttl))
        .returning(sa.func.clock_timestamp())
    ).first()
    return row[0] if row else None


def release(conn: sa.Connection, *, beat_name: str, holder: str, fence: int) -> bool:
    """Let the lease lapse now (a clean shutdown): another beat takes over at once."""
    t = job_beat_leases
    result = conn.execute(
        sa.update(t)
        .where(t.c.beat_name == beat_name, t.c.holder == holder, t.c.fence == fence)
        .values(expires_at=sa.func.now())
    )
    return result.rowcount > 0


def advance(
    conn: sa.Connection,
    *,
    beat_name: str,
    name: str,
    expected_last_run_at: datetime | None,
    last_run_at: datetime,
    next_run_at: datetime | None,
    job_id: UUID | None,
) -> bool:
    """Record a tick, only if the entry is enabled and still at ``expected_last_run_at``.

    The comparison makes a second sender of the same tick (one that read the entry
    before the first committed) change nothing: it waits on the row lock, then finds
    ``last_run_at`` moved on.
    """
    t = job_schedules
    result = conn.execute(
        sa.update(t)
        .where(
            t.c.beat_name == beat_name,
            t.c.name == name,
            t.c.enabled,
            t.c.last_run_at.is_not_distinct_from(expected_last_run_at),
        )
        .values(
            last_run_at=last_run_at,
            next_run_at=next_run_at,
            total_run_count=t.c.total_run_count + 1,
            last_job_id=job_id,
            updated_at=sa.func.now(),
        )
    )
    return result.rowcount > 0


def set_enabled(conn: sa.Connection, *, beat_name: str, name: str, enabled: bool) -> int:
    """Enable or disable an entry; the leader sees it at its next refresh."""
    t = job_schedules
    return conn.execute(
        sa.update(t)
        .where(t.c.beat_name == beat_name, t.c.name == name)
        .values(enabled=enabled, updated_at=sa.func.now())
    ).rowcount


def beats_with(conn: sa.Connection, *, name: str) -> list[str]:
    """The schedules that have an entry called ``name``."""
    t = job_schedules
    return list(
        conn.execute(
            sa.select(t.c.beat_name).where(t.c.name == name).order_by(t.c.beat_name)
        ).scalars()
    )


def rows(conn: sa.Connection, *, beat_name: str | None) -> list[ScheduleRow]:
    """Entries of one schedule, or of all, by schedule and name."""
    t = job_schedules
    stmt = sa.select(
        t.c.beat_name,
        t.c.name,
        t.c.task,
        t.c.schedule,
        t.c.enabled,
        t.c.last_run_at,
        t.c.next_run_at,
        t.c.total_run_count,
        t.c.last_job_id,
        t.c.created_at,
        t.c.updated_at,
    ).order_by(t.c.beat_name, t.c.name)
    if beat_name is not None:
        stmt = stmt.where(t.c.beat_name == beat_name)
    return [ScheduleRow(*row) for row in conn.execute(stmt)]


def leases(conn: sa.Connection, *, beat_name: str | None) -> list[LeaseRow]:
    """The lease row of one schedule, or of all."""
    t = job_beat_leases
    stmt = sa.select(
        t.c.beat_name,
        t.c.holder,
        t.c.fence,
        t.c.acquired_at,
        t.c.renewed_at,
        t.c.expires_at,
        sa.cast(sa.extract("epoch", t.c.expires_at - sa.func.now()), sa.Float),
    ).order_by(t.c.beat_name)
    if beat_name is not None:
        stmt = stmt.where(t.c.beat_name == beat_name)
    return [LeaseRow(*row) for row in conn.execute(stmt)]
