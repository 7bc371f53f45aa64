"""Statements on ``job_schedules`` and ``job_beat_leases``: the state of ``celery beat``.

``beat_schedule`` defines the entries; these rows hold what must outlive a beat
process and be shared by several: whether an entry is enabled, when it last sent,
and which process may send. Leadership is a row, not a session lock, so it works
behind PgBouncer in transaction pooling: the holder renews ``expires_at``; anyone may
take an expired row, and taking it from another holder increments ``fence``.

A tick is sent in one transaction (:meth:`Schedules.send`) that renews the lease only
while holder and fence are still the sender's, advances the entry only from the
``last_run_at`` the sender read, and (with the pgqueue broker) inserts the task's
``jobs`` row. A deposed or stale sender changes nothing, so no tick is sent twice.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import INTERVAL
from sqlalchemy.dialects.postgresql import insert as pg_insert

from celery_pgqueue.errors import UnknownScheduleEntry
from celery_pgqueue.store.tables import job_beat_leases, job_schedules

if TYPE_CHECKING:
    from celery_pgqueue.store import Store

MAX_ENTRY_NAME = 255
MAX_TEXT = 255


@dataclass(frozen=True, slots=True)
class EntryDefinition:
    """What ``beat_schedule`` says about one entry, as stored for operators."""

    name: str
    task: str
    schedule: str
    next_run_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class EntryState:
    """What the database says about one entry: the leader sends from this."""

    name: str
    enabled: bool
    last_run_at: datetime | None
    total_run_count: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Lease:
    """Leadership of one schedule: valid while ``holder`` and ``fence`` are the row's."""

    beat_name: str
    holder: str
    fence: int
    clock_offset: float
    """The database's clock minus ours, in seconds, measured by this round trip."""
    round_trip: float
    """Seconds the measuring round trip took: the offset is good to half of it."""


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """One entry as ``pgqueue schedule list`` shows it."""

    beat_name: str
    name: str
    task: str
    schedule: str
    enabled: bool
    last_run_at: datetime | None
    next_run_at: datetime | None
    total_run_count: int
    last_job_id: UUID | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """Who leads a schedule, and until when (database clock)."""

    beat_name: str
    holder: str
    fence: int
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    expires_in: float
    """Seconds until the lease lapses (negative: it has, and any beat may take it)."""


class _Undo(Exception):
    """Roll a send's transaction back, with the reason."""

    def __init__(self, outcome: Sent) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


class Sent(enum.Enum):
    """How a send ended."""

    SENT = "sent"
    FENCED = "fenced"
    """Another process holds the lease now: nothing was written."""
    STALE = "stale"
    """The entry was disabled, removed or advanced since it was read: nothing written."""


def _interval(seconds: float) -> sa.BindParameter[timedelta]:
    return sa.bindparam(None, timedelta(seconds=seconds), type_=INTERVAL)


# -- statements -------------------------------------------------------------------------


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


# -- one transaction per method ------------------------------------------------------------


class Schedules:
    """The schedule statements of one ``beat_name``, each method one transaction."""

    def __init__(self, store: Store, beat_name: str) -> None:
        self.store = store
        self.beat_name = beat_name

    def sync(self, entries: Sequence[EntryDefinition], *, remove_others: bool = True) -> None:
        """Make the table hold exactly these entries' definitions (state kept)."""
        with self.store.begin() as conn:
            upsert_entries(conn, beat_name=self.beat_name, entries=entries)
            if remove_others:
                delete_others(conn, beat_name=self.beat_name, keep=[e.name for e in entries])

    def states(self) -> list[EntryState]:
        """Every entry's enabled flag, last tick and run count."""
        with self.store.single() as conn:
            return states(conn, beat_name=self.beat_name)

    def set_next_runs(self, next_runs: Sequence[tuple[str, datetime | None]]) -> None:
        """Store the leader's estimates of the next ticks."""
        with self.store.begin() as conn:
            set_next_runs(conn, beat_name=self.beat_name, next_runs=next_runs)

    def acquire(self, holder: str, ttl: float) -> Lease | None:
        """Lead this schedule if nobody else does (or keep leading it)."""
        started = time.time()
        with self.store.single() as conn:
            got = acquire(conn, beat_name=self.beat_name, holder=holder, ttl=ttl)
        if got is None:
            return None
        fence, clock = got
        return self._lease(holder, fence, clock, started)

    def renew(self, lease: Lease, ttl: float) -> tuple[Lease | None, list[EntryState]]:
        """Extend the lease and read every entry's state, in one transaction.

        Returns (None, []) when another process took the lease over.
        """
        started = time.time()
        with self.store.begin() as conn:
            clock = renew(
                conn, beat_name=self.beat_name, holder=lease.holder, fence=lease.fence, ttl=ttl
            )
            if clock is None:
                return None, []
            found = states(conn, beat_name=self.beat_name)
        return self._lease(lease.holder, lease.fence, clock, started), found

    def release(self, lease: Lease) -> bool:
        """Give the lease up so another beat takes over without waiting for it to lapse."""
        with self.store.single() as conn:
            return release(conn, beat_name=self.beat_name, holder=lease.holder, fence=lease.fence)

    def send(
        self,
        lease: Lease,
        ttl: float,
        *,
        name: str,
        expected_last_run_at: datetime | None,
        last_run_at: datetime,
        next_run_at: datetime | None,
        job_id: UUID | None,
        publish: Callable[[sa.Connection], Any] | None = None,
    ) -> Sent:
        """Record one tick, fenced, and run ``publish`` in the same transaction.

        The lease is renewed first (its row lock holds off a takeover until the
        commit), then the entry advanced from ``expected_last_run_at``; only if both
        changed a row does ``publish`` run, on this transaction's connection, so the
        task's row commits or rolls back with the tick. An exception from ``publish``
        rolls everything back and propagates.
        """
        try:
            with self.store.begin() as conn:
                held = renew(
                    conn,
                    beat_name=self.beat_name,
                    holder=lease.holder,
                    fence=lease.fence,
                    ttl=ttl,
                )
                if held is None:
                    raise _Undo(Sent.FENCED)
                moved = advance(
                    conn,
                    beat_name=self.beat_name,
                    name=name,
                    expected_last_run_at=expected_last_run_at,
                    last_run_at=last_run_at,
                    next_run_at=next_run_at,
                    job_id=job_id,
                )
                if not moved:
                    raise _Undo(Sent.STALE)
                if publish is not None:
                    publish(conn)
        except _Undo as undo:  # rolled back: nothing of this tick was written
            return undo.outcome
        return Sent.SENT

    def _lease(self, holder: str, fence: int, clock: datetime, started: float) -> Lease:
        finished = time.time()
        offset = clock.timestamp() - (started + finished) / 2
        return Lease(
            beat_name=self.beat_name,
            holder=holder,
            fence=fence,
            clock_offset=offset,
            round_trip=finished - started,
        )


def list_entries(store: Store, beat_name: str | None) -> tuple[list[ScheduleRow], list[LeaseRow]]:
    """Entries and leases of one schedule (or all), in one transaction."""
    with store.begin() as conn:
        return rows(conn, beat_name=beat_name), leases(conn, beat_name=beat_name)


def enable(store: Store, name: str, enabled: bool, beat_name: str | None) -> str:
    """Enable or disable entry ``name``; returns the schedule it belongs to.

    Without ``beat_name`` the entry's name must be unique across schedules.
    """
    with store.begin() as conn:
        if beat_name is None:
            found = beats_with(conn, name=name)
            if not found:
                raise UnknownScheduleEntry(f"no periodic task entry named {name!r}")
            if len(found) > 1:
                raise UnknownScheduleEntry(
                    f"entry {name!r} exists in several schedules ({', '.join(found)}); "
                    "say which with --beat NAME"
                )
            beat_name = found[0]
        if not set_enabled(conn, beat_name=beat_name, name=name, enabled=enabled):
            raise UnknownScheduleEntry(
                f"no periodic task entry named {name!r} in schedule {beat_name!r}"
            )
    return beat_name
