"""The beat Scheduler: entries synced, one leader by lease, each tick sent once."""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
import uuid
from collections import deque
from datetime import datetime, timedelta
from typing import Any, cast

from celery import beat as celery_beat

from celery_pgqueue import transaction
from celery_pgqueue.beat.settings import BeatSettings
from celery_pgqueue.errors import DatabaseUnavailable
from celery_pgqueue.options import mask_password
from celery_pgqueue.store import Store
from celery_pgqueue.store.schedule import (
    MAX_TEXT,
    EntryDefinition,
    EntryState,
    Lease,
    Schedules,
    Sent,
)

logger = logging.getLogger("celery_pgqueue.beat")

# Offsets measured over the fastest of the last few round trips are the most exact.
OFFSET_SAMPLES = 16


class Scheduler(celery_beat.Scheduler):  # type: ignore[misc]
    """Celery's scheduler with entries, state and leadership in PostgreSQL."""

    #: Nothing to flush: every tick is written when it is sent.
    sync_every = 3600

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        self._settings = BeatSettings(app)
        store = Store.for_url(self._settings.url, self._settings.options)
        self._schedules = Schedules(store, self._settings.beat_name)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease: Lease | None = None
        self._offsets: deque[tuple[float, float]] = deque(maxlen=OFFSET_SAMPLES)
        self._offset = 0.0
        self._states: dict[str, EntryState] = {}
        self._renew_at = 0.0
        self._attempt_at = 0.0
        self._atomic: bool | None = None
        self._announced_follower = False
        kwargs.pop("schedule_filename", None)  # a file is what this scheduler replaces
        super().__init__(app, *args, **kwargs)
        self.max_interval: float = min(float(self.max_interval), self._settings.renew_every)

    # -- clock ------------------------------------------------------------------------

    def now(self) -> datetime:
        """The database's time now, estimated from our clock and the measured offset."""
        return self.app.now() + timedelta(seconds=self._offset)  # type: ignore[no-any-return]

    def _measured(self, lease: Lease) -> None:
        self._offsets.append((lease.round_trip, lease.clock_offset))
        self._offset = min(self._offsets)[1]

    def _local(self, moment: datetime) -> datetime:
        return moment.astimezone(self.app.timezone)

    # -- the schedule -----------------------------------------------------------------

    def setup_schedule(self) -> None:
        """Build the entries from ``beat_schedule`` and write their definitions.

        In the order of Celery's persistent scheduler: ``beat_schedule`` first, then
        the default entries (``celery.backend_cleanup``) it does not override.
        """
        self.merge_inplace(self.app.conf.beat_schedule)
        self.install_default_entries(self.schedule)
        for entry in self.schedule.values():
            # A copy: the schedule objects in app.conf.beat_schedule stay untouched.
            entry.schedule = copy.copy(entry.schedule)
            entry.schedule.nowfun = self.now
        self._schedules.store.check_schema()
        self._schedules.sync(self._definitions())
        logger.info(
            "beat: schedule %r (%d entries) in %s; lease %.1fs",
            self._settings.beat_name,
            len(self.schedule),
            self._schedules.store.url.masked(),
            self._settings.lease_seconds,
        )

    def _definitions(self) -> list[EntryDefinition]:
        return [
            EntryDefinition(
                name=entry.name,
                task=str(entry.task)[:MAX_TEXT],
                schedule=repr(entry.schedule)[:MAX_TEXT],
            )
            for entry in self.schedule.values()
        ]

    def sync(self) -> None:
        """Nothing to do: the database is written at every tick."""

    def close(self) -> None:
        """Give the lease up, so another beat takes over without waiting for it."""
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                self._schedules.release(lease)
                logger.info("beat: released the lease of schedule %r", lease.beat_name)
            except Exception as exc:  # the lease lapses by itself
                logger.warning("beat: could not release the lease: %s", exc)
        super().close()

    @property
    def info(self) -> str:
        return (
            f"    . db -> {mask_password(self._schedules.store.url.masked())} "
            f"(schedule {self._settings.beat_name!r}, lease {self._settings.lease_seconds:g}s)"
        )

    # -- leadership -------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._lease is not None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Lead or follow; as leader send every due entry. Returns seconds to sleep."""
        try:
            if not self._lead():
                return self._settings.poll
            delay = self._send_due()
        except DatabaseUnavailable as exc:
            logger.warning("beat: database unavailable (%s); trying again", exc)
            self._lease = None
            return self._settings.poll
        until_renewal = max(self._renew_at - time.monotonic(), 0.0)
        return float(min(delay, until_renewal, self.max_interval))

    def _lead(self) -> bool:
        """Whether we lead now: take the lease when free, renew it when due."""
        moment = time.monotonic()
        if self._lease is None:
            if moment < self._attempt_at:
                return False
            self._attempt_at = moment + self._settings.poll
            lease = self._schedules.acquire(self.holder, self._settings.ttl)
            if lease is None:
                if not self._announced_follower:
                    logger.info(
                        "beat: another beat leads schedule %r; standing by",
                        self._settings.beat_name,
                    )
                    self._announced_follower = True
                return False
            self._took_over(lease)
            return True
        if moment >= self._renew_at:
            self._refresh()
        return self._lease is not None

    def _took_over(self, lease: Lease) -> None:
        logger.info("beat: leading schedule %r (fence %d)", self._settings.beat_name, lease.fence)
        self._announced_follower = False
        self._lease = lease
        self._measured(lease)
        self._publishes_atomically()  # connects the producer before the first tick is due
        # The leader's beat_schedule is the one that counts from now on.
        self._schedules.sync(self._definitions())
        self._refresh()
        if self._lease is not None:
            self._schedules.set_next_runs(
                [(name, self._next_run(entry)) for name, entry in self.schedule.items()]
            )

    def _refresh(self) -> None:
        """Renew the lease and read every entry's state (enabled, last tick)."""
        assert self._lease is not None
        lease, states = self._schedules.renew(self._lease, self._settings.ttl)
        self._renew_at = time.monotonic() + self._settings.renew_every
        if lease is None:
            self._lost()
            return
        self._lease = lease
        self._measured(lease)
        self._states = {state.name: state for state in states}
        missing = [name for name in self.schedule if name not in self._states]
        if missing:
            # Removed by hand, or by a beat with another beat_schedule: ours counts.
            self._schedules.sync(self._definitions(), remove_others=False)
            self._states = {state.name: state for state in self._schedules.states()}
        for name, entry in self.schedule.items():
            state = self._states.get(name)
            if state is not None:
                entry.last_run_at = self._local(state.last_run_at or state.created_at)
                entry.total_run_count = state.total_run_count

    def _lost(self) -> None:
        logger.warning(
            "beat: another beat took over schedule %r; standing by", self._settings.beat_name
        )
        self._lease = None
        self._attempt_at = time.monotonic() + self._settings.poll

    # -- sending ----------------------------------------------------------------------

    def _send_due(self) -> float:
        """Send every due, enabled entry; seconds until the next one is due."""
        delay = float(self.max_interval)
        for name, entry in list(self.schedule.items()):
            state = self._states.get(name)
            if state is None or not state.enabled:
                continue
            try:
                due, next_in = self.is_due(entry)
            except Exception:
                due, next_in = self._due_failed(entry)
            if due:
                if not self._send(entry, state):
                    return 0.0 if self._lease is not None else self._settings.poll
                due, next_in = False, self._next_in(self.schedule[name])
            delay = min(delay, float(next_in))
        return delay

    def _due_failed(self, entry: Any) -> tuple[bool, float]:
        """An entry whose next run cannot be computed must not stop beat: retry it later.

        Celery 5.7's ``_is_due_failed`` when there is one; Celery 5.5 has none.
        """
        celery_handler = getattr(super(), "_is_due_failed", None)
        if celery_handler is not None:
            return cast("tuple[bool, float]", celery_handler(entry))
        logger.error(
            "beat: cannot calculate the next run of %r, trying again in %s s",
            entry.name,
            self.max_interval,
            exc_info=True,
        )
        return False, float(self.max_interval)

    def _send(self, entry: Any, state: EntryState) -> bool:
        """Send one tick, fenced; False if the lease or the entry changed meanwhile."""
        assert self._lease is not None
        sent_at = self.now()
        advanced = entry._next_instance(last_run_at=sent_at)
        record = {
            "name": entry.name,
            "expected_last_run_at": state.last_run_at,
            "last_run_at": sent_at,
            "next_run_at": self._next_run(advanced),
        }
        new_id = uuid.uuid4()
        task_id: uuid.UUID | None = new_id
        atomic = self._publishes_atomically()
        logger.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
        try:
            outcome = self._schedules.send(
                self._lease,
                self._settings.ttl,
                job_id=task_id,
                publish=(lambda conn: self._publish(entry, new_id, conn)) if atomic else None,
                **record,
            )
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            # As Celery's scheduler does, a tick that cannot be published is logged
            # and skipped, not retried in a loop: record it (fenced) without a job.
            logger.error("Message Error: %s", exc, exc_info=True)
            task_id = None
            outcome = self._schedules.send(self._lease, self._settings.ttl, job_id=None, **record)
        if outcome is Sent.FENCED:
            self._lost()
            return False
        if outcome is Sent.STALE:
            logger.info("beat: entry %s changed meanwhile; reading it again", entry.name)
            self._refresh()
            return False
        if not atomic and task_id is not None:
            try:
                self._publish(entry, task_id, None)
            except Exception as exc:
                logger.error("Message Error: %s", exc, exc_info=True)
        self.schedule[entry.name] = advanced
        self._states[entry.name] = EntryState(
            name=entry.name,
            enabled=True,
            last_run_at=sent_at,
            total_run_count=state.total_run_count + 1,
            created_at=state.created_at,
        )
        return True

    def _publish(self, entry: Any, task_id: uuid.UUID, conn: Any) -> None:
        """Publish one tick as Celery's scheduler does, on ``conn`` when given."""
        sending = copy.copy(entry)
        sending.options = {**(entry.options or {}), "task_id": str(task_id)}
        if conn is None:
            self.apply_async(sending, producer=self.producer, advance=False)
            return
        # Inside our transaction a connection error cannot be retried: it ends it.
        sending.options["retry"] = False
        with transaction.enqueue_in(conn):
            self.apply_async(sending, producer=self.producer, advance=False)

    def _publishes_atomically(self) -> bool:
        """Whether the broker is pgqueue on our database (decided once)."""
        if self._atomic is None:
            from celery_pgqueue.transport import Transport

            broker = self.producer.connection.transport
            ours = self._schedules.store
            self._atomic = (
                isinstance(broker, Transport)
                and broker.url.key() == ours.url.key()
                and broker.options.schema == ours.options.schema
            )
            if not self._atomic:
                logger.warning(
                    "beat: the broker is not pgqueue on %s: each tick is recorded, then "
                    "published (at most once: a crash between the two loses that tick)",
                    ours.url.masked(),
                )
        return self._atomic

    def _next_in(self, entry: Any) -> float:
        try:
            return float(self.is_due(entry)[1])
        except Exception:
            return float(self.max_interval)

    def _next_run(self, entry: Any) -> datetime | None:
        """When ``entry`` will next be due, for operators (None if it cannot say)."""
        try:
            remaining = entry.schedule.remaining_estimate(entry.last_run_at)
        except Exception:
            return None
        return self.now() + max(remaining, timedelta(0))  # type: ignore[no-any-return]
