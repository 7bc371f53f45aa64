"""NOTIFY channels, and waking clients that wait on results: one LISTEN connection per
process, any number of waiters.

Each migrated schema has two channels (:class:`Channels`) whose names are random and
kept in ``job_channels``: a role that cannot read that table cannot name them, hence
cannot LISTEN to what they carry, and they are at most 48 bytes whatever the schema's
name.

Every result write that reaches a ready state sends ``NOTIFY <results channel>, '<job
id>'`` in its own transaction; a success with a small result sends ``'<job id> <epoch
of completed_at> <result JSON>'``, so its waiter has it without reading it back. A
client process keeps one dedicated autocommit connection LISTENing on that channel,
read by one daemon thread, which hands each payload to every registered waiter (the
result backend's consumers, one per thread that waits). A producer waiting on 1,000
results therefore holds one listening connection, not 1,000, and no connection from
the pool.

The thread reconnects after a drop and then asks every waiter to re-read what it waits
for (notifications sent while nobody listened are gone). When the channel has been
silent for a while it probes itself: a NOTIFY sent through the pool must come back on
the LISTEN connection, or that connection is presumed dead (a half-open TCP
connection, a pooler that drops LISTEN) and is replaced. After a fork the child starts
its own thread and connection; the parent's socket is left alone.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from time import monotonic
from typing import Protocol

from celery_pgqueue.errors import ConnectionRejected, DatabaseUnavailable, SchemaMissing
from celery_pgqueue.options import IDENTIFIER_BYTES, DatabaseURL
from celery_pgqueue.store.listener import Listener

logger = logging.getLogger("celery_pgqueue")

PROBE = ""
"""Payload of the self-probe; never a job id."""

INLINE_RESULT_BYTES = 7000
"""A success whose stored result (JSON text) is at most this long rides in its
notification (PostgreSQL's limit for a payload is 8000 bytes)."""


@dataclass(frozen=True, slots=True)
class Channels:
    """The NOTIFY channels of one schema, as ``job_channels`` names them."""

    queues: str
    """Wakes workers; the payload is the name of a queue with new ready work."""
    results: str
    """Wakes result waiters; the payload is a job id, maybe with its result."""

    @classmethod
    def from_rows(cls, names: Mapping[str, str], where: str) -> Channels:
        """Validate the names read from ``job_channels`` (``where`` names the schema)."""
        found = {}
        for purpose in ("queues", "results"):
            name = names.get(purpose)
            if not name or len(name.encode()) > IDENTIFIER_BYTES or "\x00" in name:
                raise SchemaMissing(
                    f"job_channels in {where} has no usable {purpose!r} channel name "
                    f"(got {name!r}; it must be 1 to {IDENTIFIER_BYTES} bytes): give that "
                    "row a random name such as 'pgqueue_' and 32 hex digits (see the "
                    "README's Security section), then restart the processes"
                )
            found[purpose] = name
        return cls(**found)


@dataclass(frozen=True, slots=True)
class ResultNote:
    """A success as its notification carried it: enough for the waiter's meta."""

    result_json: str
    finished_at: datetime


def result_note(payload: str) -> tuple[str, ResultNote | None]:
    """Split a results-channel payload: ``'<job id>'`` or ``'<job id> <epoch> <json>'``."""
    job_id, _, rest = payload.partition(" ")
    if not rest:
        return job_id, None
    epoch, _, result_json = rest.partition(" ")
    try:
        finished_at = datetime.fromtimestamp(float(epoch), tz=UTC)
    except ValueError:
        return job_id, None
    return job_id, ResultNote(result_json, finished_at)


PROBE_AFTER = 30.0
"""Seconds of silence, while someone waits, before the listener probes itself."""
PROBE_TIMEOUT = 5.0
"""Seconds a probe may take to come back before the connection is replaced."""
WAIT_SLICE = 1.0
"""Longest single wait on the socket, so a stop or a probe is never late by more."""
MAX_BACKOFF = 2.0


class Waiter(Protocol):
    """What the listener calls; both run on the listener's thread and must not block."""

    def notified(self, notes: Mapping[str, ResultNote | None]) -> None:
        """These jobs (ids as text) reached a ready state; a success may carry its
        result (see :func:`result_note`)."""

    def resync(self) -> None:
        """Notifications may have been missed: read everything you wait for again."""


class ResultListener:
    """The process's LISTEN connection on the results channel and its reader thread."""

    _registry: dict[tuple[str, str], ResultListener] = {}
    _registry_lock = threading.Lock()

    def __init__(
        self,
        url: DatabaseURL,
        channel: str,
        *,
        connect_timeout: float,
        probe: Callable[[str], None],
    ) -> None:
        self.url = url
        self.channel = channel
        self.connect_timeout = connect_timeout
        self._probe = probe
        self._waiters: weakref.WeakSet[Waiter] = weakref.WeakSet()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._attempted = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._listener: Listener | None = None

    @classmethod
    def shared(
        cls,
        url: DatabaseURL,
        channel: str,
        *,
        connect_timeout: float,
        probe: Callable[[str], None],
    ) -> ResultListener:
        """The one listener of this process for this database and channel."""
        key = (url.key(), channel)
        with cls._registry_lock:
            listener = cls._registry.get(key)
            if listener is None:
                listener = cls._registry[key] = cls(
                    url, channel, connect_timeout=connect_timeout, probe=probe
                )
            return listener

    # -- waiters ---------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        """True while notifications are being received (else waiters poll)."""
        return self._pid == os.getpid() and self._listening.is_set()

    def register(self, waiter: Waiter) -> None:
        """Start delivering notifications to ``waiter`` (held weakly)."""
        self._waiters.add(waiter)

    def unregister(self, waiter: Waiter) -> None:
        self._waiters.discard(waiter)

    def ensure_listening(self) -> bool:
        """Start the reader thread if needed; True once it LISTENs.

        A waiter must be listening before it reads the state it waits for, or a result
        written in between would go unnoticed. The first call waits for the first
        connection attempt (at most ``connect_timeout``); while the connection is down
        it returns False at once and the waiter reads the database itself, which
        raises DatabaseUnavailable if the server is gone.
        """
        if self.listening:
            return True
        with self._lock:
            if self._pid != os.getpid():
                self._after_fork()
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._attempted.clear()
                self._thread = threading.Thread(
                    target=self._run, name="celery-pgqueue-results", daemon=True
                )
                self._thread.start()
        self._attempted.wait(self.connect_timeout + 1.0)
        return self.listening

    @property
    def error(self) -> BaseException | None:
        """Why the connection is down, if it is."""
        return self._error

    @classmethod
    def stop_all(cls) -> None:
        """Stop every listener of this process and forget them (tests, shutdown)."""
        with cls._registry_lock:
            listeners = list(cls._registry.values())
            cls._registry.clear()
        for listener in listeners:
            listener.stop()

    def stop(self) -> None:
        """Stop the reader thread and close the connection (tests, shutdown)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=WAIT_SLICE * 3)

    def _after_fork(self) -> None:
        # The thread did not survive the fork; the socket belongs to the parent.
        if self._listener is not None:
            self._listener.forget_after_fork()
        self._reset()

    @classmethod
    def _after_fork_in_child(cls) -> None:
        # Any parent thread may have held these locks at the fork, and it does not
        # exist in the child to release them: every one is made anew.
        cls._registry_lock = threading.Lock()
        for listener in list(cls._registry.values()):
            listener._after_fork()

    # -- the reader thread -----------------------------------------------------------

    def _run(self) -> None:
        listener = self._listener = Listener(
            self.url, [self.channel], connect_timeout=self.connect_timeout
        )
        backoff = 0.05
        last_heard = monotonic()
        probe_sent: float | None = None
        try:
            while not self._stop.is_set():
                try:
                    if not listener.connected:
                        try:
                            listener.connect()
                        finally:
                            self._attempted.set()
                        self._error = None
                        self._listening.set()
                        last_heard, probe_sent, backoff = monotonic(), None, 0.05
                        self._broadcast_resync()
                    notes = listener.wait(WAIT_SLICE)
                    if notes:
                        last_heard, probe_sent = monotonic(), None
                        # Parsed once here, not once per waiting thread.
                        parsed = dict(result_note(p) for _, p in notes if p != PROBE)
                        if parsed:
                            self._broadcast(parsed)
                        continue
                    silent = monotonic() - last_heard
                    if probe_sent is not None and monotonic() - probe_sent > PROBE_TIMEOUT:
                        raise DatabaseUnavailable(
                            f"LISTEN connection to {self.url.masked()} did not hear its own "
                            f"probe within {PROBE_TIMEOUT}s"
                        )
                    if probe_sent is None and silent > PROBE_AFTER and len(self._waiters):
                        self._probe(PROBE)
                        probe_sent = monotonic()
                except (DatabaseUnavailable, ConnectionRejected) as exc:
                    # A refused login reaches the waiters as the named error when they
                    # read the row themselves; no traceback per retry here.
                    self._lost(listener, exc)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                except Exception as exc:  # keep listening whatever a waiter did
                    logger.exception("pgqueue result listener failed; reconnecting")
                    self._lost(listener, exc)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            self._listening.clear()
            listener.close()

    def _lost(self, listener: Listener, exc: BaseException) -> None:
        """Connection gone: waiters fall back to reading the database themselves."""
        was_listening = self._listening.is_set()
        self._listening.clear()
        self._error = exc
        listener.close()
        if was_listening:
            logger.warning("pgqueue result listener lost its connection: %s", exc)
        self._broadcast_resync()

    def _broadcast(self, notes: Mapping[str, ResultNote | None]) -> None:
        for waiter in list(self._waiters):
            waiter.notified(notes)

    def _broadcast_resync(self) -> None:
        for waiter in list(self._waiters):
            waiter.resync()


os.register_at_fork(after_in_child=ResultListener._after_fork_in_child)
