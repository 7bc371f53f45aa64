"""Lease renewal: one keeper per process and database, on a connection of its own.

A claimed job is ``running`` under a lease of ``lease_seconds``; maintenance in any
process takes back a job whose lease ran out. So a process must renew the leases of
every job it still holds for as long as it holds them, whatever else it is doing:

* **Its own connection and thread.** Renewal never waits for the shared pool (a
  threads pool with more threads than connections, every one busy) nor for
  maintenance (a long retention batch runs on another thread), nor for the event
  loop (a solo pool runs its task inside it). The connection is opened on the first
  renewal that has something to renew and closed when the keeper goes idle.
* **The rule for stalls.** Leases are renewed every ``lease_seconds / 3``. A stall of
  the whole process (a C extension holding the GIL, swapping, SIGSTOP) shorter than
  two thirds of the lease therefore loses nothing: the renewal that fell due during
  the stall runs when it ends, before the lease runs out. A longer stall may lose the
  lease (logged at WARNING when the renewal finally runs), which is the point of a
  lease: the process looked dead. Maintenance in this process renews first when
  renewal is due and never takes back the jobs this process still holds
  (:meth:`LeaseKeeper.before_rescue`), so after a stall it does not rescue its own
  live jobs; other processes' maintenance still does once the lease has run out.
* **Process-wide.** What is held comes from every attached consumer (deliveries not
  yet acked, :class:`LeaseSource`) and from Celery's own record of the requests this
  process is running or has reserved (``celery.worker.state``), which outlives any
  one connection: when a worker's consumer reconnects and its Transport is replaced,
  the tasks still running in its pool keep their leases. The lease owner is one name
  per process (:func:`process_owner`) for the same reason.
* **Queues too.** Queues declared with ``x-expires`` (Celery's event receivers and
  mailboxes, Kombu applications) are kept alive while a consumer of this process
  consumes them, on the same connection and schedule (at least three times per
  expiry period).
* **Nothing dropped silently.** When the held jobs of a source cannot be read, the
  ones it last reported are renewed again and a WARNING names them.

The keeper starts with the first consumer in the process (an event-loop worker or a
synchronous ``drain_events()`` loop alike) and stops when nothing is held and nobody
consumes. After a fork the child starts with no keeper and a new owner name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import uuid
import weakref
from collections.abc import Iterable
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

from celery_pgqueue import delivery
from celery_pgqueue.errors import DatabaseUnavailable
from celery_pgqueue.ids import job_id_for

if TYPE_CHECKING:
    from celery_pgqueue.store import Store

logger = logging.getLogger("celery_pgqueue")

RENEWALS_PER_LEASE = 3
"""Renewals per lease period: a stall shorter than ``(n - 1) / n`` of the lease is safe."""
MIN_PERIOD = 0.2
"""Shortest renewal period, whatever the lease or queue expiry."""
SHOWN_IDS = 20
"""Most job ids a warning lists."""


class LeaseSource(Protocol):
    """A consumer whose deliveries (not yet acked) and queues the keeper renews."""

    def held_jobs(self) -> list[uuid.UUID]:
        """Jobs delivered to this consumer and not yet acked; may raise."""

    def expiring_queues(self) -> list[tuple[str, float]]:
        """``(queue, x-expires seconds)`` of the queues this consumer keeps alive."""


_owner: str | None = None


def process_owner() -> str:
    """The lease owner name of this process: ``host:pid:random``, new after a fork."""
    global _owner
    if _owner is None:
        _owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return _owner


def renewal_period(lease_seconds: float, queue_expiries: Iterable[float] = ()) -> float:
    """Seconds between renewals: a third of the lease (or of the shortest queue expiry)."""
    shortest = min([lease_seconds, *queue_expiries])
    return max(MIN_PERIOD, shortest / RENEWALS_PER_LEASE)


def celery_held_jobs() -> list[uuid.UUID]:
    """Jobs of the requests Celery is running or has reserved in this process.

    Read from ``celery.worker.state`` only if a worker loaded it (a plain Kombu
    process has none). May raise; the caller logs and carries the last known set.
    """
    state: Any = sys.modules.get("celery.worker.state")
    if state is None:
        return []
    requests: list[Any] = []
    for collection in (state.active_requests, state.reserved_requests):
        for attempt in range(3):
            try:
                requests.extend(list(collection))
                break
            except RuntimeError:  # changed size during iteration (another thread)
                if attempt == 2:
                    raise
    return [_request_job(request) for request in requests]


def lease_store(store: Store) -> Store:
    """A private store of one connection for renewals: apart from ``store``'s pool.

    Same database, schema and options (the role's ``lease_seconds``); its session is
    named ``<application_name>-lease`` in ``pg_stat_activity`` and, unless the URL
    says otherwise, gives up on a dead TCP connection within one lease
    (``tcp_user_timeout``) instead of hanging until the kernel does (minutes).
    """
    from celery_pgqueue.store import Store

    query = dict(store.url.query)
    query["application_name"] = query.get("application_name", "celery-pgqueue") + "-lease"
    query.setdefault("tcp_user_timeout", str(max(1000, round(store.options.lease_seconds * 1000))))
    url = dataclasses.replace(store.url, query=tuple(query.items()))
    options = dataclasses.replace(store.options, pool_size=1, max_overflow=0)
    return Store(url, options)


def _request_job(request: Any) -> uuid.UUID:
    """The row a request was delivered from: a task sent to several queues has one each."""
    message = getattr(request, "message", None)
    properties = getattr(message, "properties", None) or {}
    job = properties.get(delivery.JOB) if isinstance(properties, dict) else None
    return uuid.UUID(job) if job else job_id_for(request.id)


class LeaseKeeper:
    """Renews this process's leases and queue expiries for one store (see the module)."""

    _registry: dict[int, LeaseKeeper] = {}
    _registry_lock = threading.Lock()

    def __init__(self, store: Store) -> None:
        self.store = store
        self._sources: weakref.WeakSet[LeaseSource] = weakref.WeakSet()
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()  # the thread's life and the set of sources
        self._renewing = threading.Lock()  # one renewal at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_renewal: float | None = None
        self._last_held: dict[int, list[uuid.UUID]] = {}
        self._session: Store | None = None  # lease_store(), opened on first renewal

    @classmethod
    def for_store(cls, store: Store) -> LeaseKeeper:
        """The keeper of this process for ``store`` (created once)."""
        with cls._registry_lock:
            keeper = cls._registry.get(id(store))
            if keeper is None or keeper.store is not store:
                keeper = cls._registry[id(store)] = cls(store)
            return keeper

    @classmethod
    def stop_all(cls) -> None:
        """Stop every keeper of this process (tests, before dropping a database)."""
        with cls._registry_lock:
            keepers = list(cls._registry.values())
            cls._registry.clear()
        for keeper in keepers:
            keeper.stop()

    @classmethod
    def _after_fork_in_child(cls) -> None:
        # The parent's threads did not survive the fork and any of them may have held
        # one of these locks at that moment: make new ones, keep no parent's state.
        global _owner
        _owner = None
        cls._registry_lock = threading.Lock()
        keepers = list(cls._registry.values())
        cls._registry.clear()
        for keeper in keepers:
            keeper._sources = weakref.WeakSet()
            keeper._reset()

    # -- consumers -------------------------------------------------------------------

    @property
    def owner(self) -> str:
        return process_owner()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def attach(self, source: LeaseSource) -> None:
        """Renew what ``source`` holds from now on; starts the keeper's thread."""
        with self._lock:
            self._sources.add(source)
            self._start_locked()

    def detach(self, source: LeaseSource) -> None:
        """Stop renewing for ``source`` (its connection closed)."""
        with self._lock:
            self._sources.discard(source)
            self._last_held.pop(id(source), None)

    def stop(self) -> None:
        """Stop the thread and close the lease connection (tests, shutdown)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._close_session()

    def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.dispose()

    def _start_locked(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pgqueue-leases", daemon=True)
        self._thread.start()

    # -- renewing --------------------------------------------------------------------

    def held_jobs(self) -> list[uuid.UUID]:
        """Every job this process can vouch for: sources' deliveries and Celery's requests.

        A source that cannot say (it raised) keeps its last known jobs, named in a
        WARNING: renewing a job a little longer is safe, dropping a live one is not.
        """
        ids: set[uuid.UUID] = set()
        for source in list(self._sources):
            key = id(source)
            try:
                held = source.held_jobs()
            except Exception as exc:
                held = self._last_held.get(key, [])
                logger.warning(
                    "pgqueue could not read the jobs a consumer holds (%s); renewing the %d it "
                    "held last: %s",
                    exc,
                    len(held),
                    _shown(held),
                )
            else:
                self._last_held[key] = held
            ids.update(held)
        try:
            requests = celery_held_jobs()
        except Exception as exc:
            requests = self._last_held.get(0, [])
            logger.warning(
                "pgqueue could not read the tasks Celery is running (%s); renewing the %d "
                "it ran last: %s",
                exc,
                len(requests),
                _shown(requests),
            )
        else:
            self._last_held[0] = requests
        ids.update(requests)
        return sorted(ids)

    def expiring_queues(self) -> list[tuple[str, float]]:
        """Queues with an ``x-expires`` that a consumer of this process keeps alive."""
        queues: dict[str, float] = {}
        for source in list(self._sources):
            try:
                for name, seconds in source.expiring_queues():
                    queues[name] = min(seconds, queues.get(name, seconds))
            except Exception as exc:
                logger.warning("pgqueue could not read the queues a consumer uses: %s", exc)
        return sorted(queues.items())

    def renew(self) -> bool:
        """Renew every lease and queue expiry this process holds, now; False if idle.

        On the store's dedicated lease connection; a connection lost since the last
        renewal (a server restart) is replaced and the renewal tried once more at once.
        """
        with self._renewing:
            held = self.held_jobs()
            queues = self.expiring_queues()
            now = monotonic()
            lease = self.store.options.lease_seconds
            if self._last_renewal is not None and held and now - self._last_renewal > lease:
                logger.warning(
                    "pgqueue renewed leases %.1fs after the previous renewal, longer than "
                    "lease_seconds=%s: this process was stalled (a C extension holding the "
                    "GIL, swapping, a stopped process?) and another worker may have taken "
                    "over jobs %s. Renewal runs every lease_seconds/%d, so stalls shorter "
                    "than two thirds of the lease are safe: raise lease_seconds above 1.5x "
                    "the longest stall.",
                    now - self._last_renewal,
                    lease,
                    _shown(held),
                    RENEWALS_PER_LEASE,
                )
            if held or queues:
                try:
                    self._renew(held, queues)
                except DatabaseUnavailable:
                    self._renew(held, queues)
            self._last_renewal = now
            return bool(held or queues or self._sources)

    def _renew(self, held: list[uuid.UUID], queues: list[tuple[str, float]]) -> None:
        if self._session is None:
            self._session = lease_store(self.store)
        if held:
            self._session.heartbeat(self.owner, held)
        if queues:
            self._session.touch_queues(queues)

    def before_rescue(self) -> tuple[str, list[uuid.UUID]]:
        """What this process's own rescue must spare: ``(owner, held job ids)``.

        Renews first if a renewal is due: after a stall every thread wakes at once,
        and the leases other processes see should be current before anyone rescues.
        Sparing the held jobs as well makes the own pass exact, however long the
        rescue statement itself is delayed (a starved process, a busy pool).
        """
        last = self._last_renewal
        if last is None or monotonic() - last >= self.period():
            self.renew()
        return self.owner, self.held_jobs()

    def period(self) -> float:
        """Seconds until the next renewal is due."""
        expiries = [seconds for _, seconds in self.expiring_queues()]
        return renewal_period(self.store.options.lease_seconds, expiries)

    def _run(self) -> None:
        # Whoever attached has just claimed or declared (which set the lease and the
        # expiry): the first renewal is one period away. A short-lived client (an
        # `inspect` call) is gone by then and never opens the lease session.
        self._last_renewal = monotonic()
        self._stop.wait(self.period())
        while True:
            busy = True
            if not self._stop.is_set():
                try:
                    busy = self.renew()
                except Exception as exc:
                    logger.warning(
                        "pgqueue could not renew leases (retrying every %.1fs): %s",
                        self.period(),
                        exc,
                    )
            with self._lock:
                if self._stop.is_set() or (not busy and not self._sources):
                    # Stopped, or nothing held and nobody consuming: let the session
                    # go; the next attach starts a new thread.
                    self._thread = None
                    self._last_renewal = None
                    self._close_session()
                    return
            self._stop.wait(self.period())


def _shown(ids: list[uuid.UUID]) -> str:
    text = ", ".join(str(i) for i in ids[:SHOWN_IDS])
    return text + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


os.register_at_fork(after_in_child=LeaseKeeper._after_fork_in_child)
