"""Waiting for results: one consumer per backend, woken by the process's LISTEN thread."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from time import monotonic
from typing import Any
from uuid import UUID

from celery.backends.asynchronous import BaseResultConsumer, Drainer

from celery_pgqueue.ids import job_id_for
from celery_pgqueue.store.notify import ResultListener, ResultNote

WAKE_INTERVAL = 1.0
"""Longest single sleep in get(): ``on_interval`` (parent errors) runs at least this often."""
RESYNC_INTERVAL = 10.0
"""A listening client still re-reads what it waits for this often, for rows finished by
something that sent no NOTIFY (an operator's SQL, a transport that cancels a row)."""
EXPIRY_LOOKUP_AFTER = WAKE_INTERVAL
"""A client that has waited this long on a task asks once when it expires (if ever), so
a ``get()`` on a task nobody runs raises TaskRevokedError when it expires, while a
``get()`` that returns sooner costs no query."""

_consumers: weakref.WeakSet[ResultConsumer] = weakref.WeakSet()


def _reset_consumers_after_fork() -> None:
    for consumer in list(_consumers):
        consumer.on_after_fork()


os.register_at_fork(after_in_child=_reset_consumers_after_fork)


class ResultConsumer(BaseResultConsumer):  # type: ignore[misc]
    """Waits for results on behalf of one backend (one per thread, like Celery's).

    The process's :class:`ResultListener` thread reads the LISTEN socket and calls
    :meth:`notified`; a waiting thread sleeps on a condition until a job it waits for
    is named, then reads those jobs in one query. Without NOTIFY (option off, or the
    connection down) it reads everything it waits for every ``polling_interval``, so a
    database that went away surfaces as DatabaseUnavailable instead of a hang.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The listener thread does the socket work and waiters only sleep on a
        # condition, so Celery's greenlet drainers (a loop around drain_events) would
        # add nothing but a second reader.
        self.drainer = Drainer(self)
        self._reset()

    def _reset(self, resync: bool = False) -> None:
        # Reentrant: AsyncResult.__del__ (cancel_for) can run from the garbage collector
        # on a thread that already holds it.
        self._cond = threading.Condition(threading.RLock())
        self._wanted: dict[str, str] = getattr(self, "_wanted", {})  # str(jobs.id) -> task id
        # Expiry of what we wait for: since when (monotonic), asked already, and when
        # each waited-for task expires by the database's clock (as a monotonic time).
        self._since: dict[str, float] = getattr(self, "_since", {})
        self._expiry_asked: set[str] = getattr(self, "_expiry_asked", set())
        self._expiry_due: dict[str, float] = getattr(self, "_expiry_due", {})
        self._notified: set[str] = set()
        self._inline: dict[str, ResultNote] = {}  # successes their notification carried
        self._resync_due = resync
        self._generation = 0
        self._last_full_read = monotonic()
        _consumers.add(self)

    def on_after_fork(self) -> None:
        # The lock may have been held by a thread that did not survive the fork. What
        # this consumer waits for stays: results inherited from the parent are still
        # pending, and the first wait re-reads them.
        self._reset(resync=True)

    # -- called by Celery ------------------------------------------------------------

    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def consume_from(self, task_id: str) -> None:
        with self._cond:
            key = str(job_id_for(task_id))
            self._wanted[key] = task_id
            self._since.setdefault(key, monotonic())
        listener = self._listener()
        if listener is not None:
            listener.register(self)
            listener.ensure_listening()

    def cancel_for(self, task_id: str) -> None:
        key = str(job_id_for(task_id))
        with self._cond:
            self._wanted.pop(key, None)
            self._notified.discard(key)
            self._inline.pop(key, None)
            self._since.pop(key, None)
            self._expiry_asked.discard(key)
            self._expiry_due.pop(key, None)

    def stop(self) -> None:
        listener = self._listener()
        if listener is not None:
            listener.unregister(self)

    def on_wait_for_pending(self, result: Any, **kwargs: Any) -> None:
        # Read once after subscribing: a task may have finished before we listened.
        for meta in result._iter_meta(**kwargs):
            if meta is not None:
                self.on_state_change(meta, None)

    def drain_events_until(
        self, p: Any, timeout: float | None = None, on_interval: Any = None
    ) -> Iterator[None]:
        """Wait until ``p`` is ready; unlike Celery's Drainer, connection errors propagate.

        Celery's Drainer swallows OSError and retries forever; DatabaseUnavailable is a
        ConnectionError, and a client waiting on a database that went away must get it.
        """
        deadline = None if timeout is None else monotonic() + timeout
        while not p.ready:
            wait = WAKE_INTERVAL
            if deadline is not None:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    raise TimeoutError()  # socket.timeout: Celery turns it into its own
                wait = min(wait, remaining)
            self.drain_events(timeout=wait)
            yield
            if on_interval:
                on_interval()

    def drain_events(self, timeout: float | None = None) -> None:
        """Sleep until an awaited job is notified (or ``timeout``), then read it."""
        backend = self.backend
        listener = self._listener()
        listening = listener is not None and listener.listening
        wait = WAKE_INTERVAL if timeout is None else timeout
        if not listening:
            wait = min(wait, backend.options.polling_interval)
        with self._cond:
            if self._expiry_due:
                wait = min(wait, max(0.0, min(self._expiry_due.values()) - monotonic()))
            generation = self._generation
            self._cond.wait_for(
                lambda: self._has_work(listening) or self._generation != generation, wait
            )
            full = (
                not listening
                or self._resync_due
                or monotonic() - self._last_full_read >= RESYNC_INTERVAL
            )
            carried: list[tuple[str, ResultNote]] = []
            if full:
                ids = list(self._wanted.values())
                self._resync_due = False
                self._last_full_read = monotonic()
            else:
                ids = []
                for key in self._notified:
                    task_id = self._wanted.get(key)
                    if task_id is None:
                        continue
                    note = self._inline.get(key)
                    if note is not None and not backend._extended:
                        carried.append((task_id, note))
                    else:
                        ids.append(task_id)
            self._notified.clear()
            self._inline.clear()
            now = monotonic()
            expiring = [k for k, at in self._expiry_due.items() if at <= now]
            unasked = [
                k
                for k, since in self._since.items()
                if k not in self._expiry_asked and now - since >= EXPIRY_LOOKUP_AFTER
            ]
        try:
            for task_id, note in carried:
                self.on_state_change(backend._carried_meta(task_id, note), None)
            if ids:
                for meta in backend._ready_metas(ids):
                    self.on_state_change(meta, None)
            if expiring or unasked:
                self._mind_expiry(expiring, unasked)
        finally:
            with self._cond:
                self._generation += 1
                self._cond.notify_all()

    # -- called by the listener thread -----------------------------------------------

    def notified(self, notes: Mapping[str, ResultNote | None]) -> None:
        with self._cond:
            hits = self._wanted.keys() & notes.keys()
            if hits:
                self._notified |= hits
                for key in hits:
                    note = notes[key]
                    if note is not None:
                        self._inline[key] = note
                self._cond.notify_all()

    def resync(self) -> None:
        with self._cond:
            self._resync_due = True
            self._cond.notify_all()

    # -- internals -------------------------------------------------------------------

    def _mind_expiry(self, expiring: list[str], unasked: list[str]) -> None:
        """Record the waited-for tasks whose ``expires`` passed; learn when others expire.

        Nobody may consume the queue (no worker, or a busy one): without this a
        ``get()`` would wait for maintenance or forever. The database decides what has
        expired; its NOTIFY (or the re-read asked for here) then wakes us with REVOKED.
        """
        store = self.backend.store
        if expiring:
            if store.expire_tasks([UUID(k) for k in expiring]):
                self.resync()
            with self._cond:
                for key in expiring:
                    self._expiry_due.pop(key, None)
            unasked = [*unasked, *expiring]  # not expired yet by the database: ask again
        left = store.seconds_to_expiry([UUID(k) for k in unasked])
        now = monotonic()
        with self._cond:
            for key in unasked:
                if key not in self._wanted:
                    continue
                self._expiry_asked.add(key)
                seconds = left.get(UUID(key))
                if seconds is not None:
                    self._expiry_due[key] = now + max(0.0, seconds)

    def _has_work(self, listening: bool) -> bool:
        return self._resync_due or (listening and bool(self._notified))

    def _listener(self) -> ResultListener | None:
        if not self.backend.options.use_notify:
            return None
        listener: ResultListener = self.backend.store.result_listener()
        return listener
