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

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import sqlalchemy as sa

from celery_pgqueue.errors import UnknownScheduleEntry
from celery_pgqueue.store.beat_records import (
    MAX_ENTRY_NAME,
    MAX_TEXT,
    EntryDefinition,
    EntryState,
    Lease,
    LeaseRow,
    ScheduleRow,
    Sent,
    Undo,
)
from celery_pgqueue.store.beat_statements import (
    acquire,
    advance,
    beats_with,
    delete_others,
    leases,
    release,
    renew,
    rows,
    set_enabled,
    set_next_runs,
    states,
    upsert_entries,
)

if TYPE_CHECKING:
    from celery_pgqueue.store import Store


__all__ = [
    "MAX_ENTRY_NAME",
    "MAX_TEXT",
    "EntryDefinition",
    "EntryState",
    "Lease",
    "LeaseRow",
    "ScheduleRow",
    "Schedules",
    "Sent",
    "enable",
    "list_entries",
]


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
                    raise Undo(Sent.FENCED)
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
                    raise Undo(Sent.STALE)
                if publish is not None:
                    publish(conn)
        except Undo as undo:  # rolled back: nothing of this tick was written
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
