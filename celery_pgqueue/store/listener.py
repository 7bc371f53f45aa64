"""LISTEN on fixed channels over one dedicated connection.

Workers sleep on this connection's socket instead of polling: a publish commits, the
server sends a NOTIFY, the socket becomes readable. The connection is autocommit and
runs no other statement. Channel names are read from the schema's ``job_channels``
(random, and secret to roles that cannot read the tier), never user input.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Sequence

import psycopg
from psycopg import sql

from celery_pgqueue.errors import DatabaseUnavailable, first_line
from celery_pgqueue.options import DatabaseURL
from celery_pgqueue.store.refusal import connection_failure

SCHEDULED_MARK = "\x1f"
"""Separates a queue name from the seconds until its soonest new scheduled job."""


DRAINED_MARK = "\x1e"
"""Separates a queue name from the lease owner whose claim drained it."""


EPOCH_MARK = "\x1d"
"""Separates a note's queue or owner from a time on the database's clock (Unix
seconds): when a claim began, or when a queue's soonest scheduled job comes due."""


def drained_payload(queue: str, owner: str) -> str:
    """The note a claim sends when it drained ``queue``: other woken workers need not
    claim it. An empty ``owner`` hands the turn on: "wake up, I cannot claim it"."""
    return f"{queue}{DRAINED_MARK}{owner}"


def claim_note_prefix(queue: str, owner: str) -> str:
    """A claim's drained note less the claim's start, which its statement appends: the
    note then also says which scheduled jobs the claim covers (``run_at`` up to then)."""
    return f"{drained_payload(queue, owner)}{EPOCH_MARK}"


def drained_note(payload: str) -> tuple[str, str, float | None] | None:
    """``(queue, owner, began)`` of a drained note (``began``: when the claim began on
    the database's clock, None if the note does not say), or None for any other."""
    queue, mark, owner = payload.rpartition(DRAINED_MARK)
    if not mark or SCHEDULED_MARK in owner:
        return None
    owner, stamp, began = owner.partition(EPOCH_MARK)
    return queue, owner, _number(began) if stamp else None


def due_payload(queue: str, run_at: float | None, seconds: float | None) -> str:
    """A worker's word to its peers on ``queue`` after its look-up: the soonest job
    comes due at ``run_at`` (database clock), ``seconds`` from the look-up; both None:
    none is scheduled. :data:`SCHEDULED_MARK` last, so workers of an earlier version
    read it as a hint for a queue they do not consume, and ignore it."""
    at = "" if run_at is None else repr(run_at)
    after = "Infinity" if seconds is None else repr(seconds)
    return f"{queue}{EPOCH_MARK}{at}{SCHEDULED_MARK}{after}"


def wake_note(payload: str) -> tuple[str, float | None, float | None]:
    """A queue channel payload: ``(queue, None, None)`` for "jobs are due now", or
    ``(queue, seconds, run_at)`` for "a job of this queue comes due in that many
    seconds" (``run_at``: when, on the database's clock, if the note says; a publish's
    note does not). ``seconds`` infinite: no job of the queue is scheduled.

    A queue name may in principle contain the marks too, so a caller treats the whole
    payload as a queue name as well (a name it does not consume changes nothing).
    """
    queue, mark, seconds = payload.rpartition(SCHEDULED_MARK)
    if not mark:
        return payload, None, None
    after = _number(seconds)
    if after is None:
        return payload, None, None
    named, stamp, at = queue.rpartition(EPOCH_MARK)
    if stamp and (at == "" or _number(at) is not None):
        return named, max(0.0, after), _number(at)
    return queue, max(0.0, after), None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class Listener:
    """A LISTEN connection: ``fileno()`` for event loops, ``drain()``/``wait()`` to read."""

    def __init__(
        self, url: DatabaseURL, channels: Sequence[str], *, connect_timeout: float = 10.0
    ) -> None:
        self.url = url
        self.channels = tuple(channels)
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._lock = threading.Lock()

    @property
    def application_name(self) -> str:
        """The URL's ``application_name`` (or ``celery-pgqueue``) plus ``-listen``.

        Set explicitly because keyword arguments override the URL's; the suffix tells
        this session apart from the pool's in ``pg_stat_activity``.
        """
        return dict(self.url.query).get("application_name", "celery-pgqueue") + "-listen"

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def connect(self) -> None:
        """Open the connection and LISTEN (again, after a drop)."""
        self.close()
        conn = None
        try:
            conn = psycopg.connect(
                self.url.libpq_url(),
                autocommit=True,
                connect_timeout=max(1, round(self.connect_timeout)),
                application_name=self.application_name,
            )
            for channel in self.channels:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except psycopg.OperationalError as exc:
            if conn is None:  # connecting failed: a refusal retrying cannot fix stops here
                failure = connection_failure(exc, self.url, self.connect_timeout)
                if not isinstance(failure, DatabaseUnavailable):
                    raise failure from exc
            raise DatabaseUnavailable(
                f"cannot LISTEN on {self.url.masked()}: {first_line(exc)}"
            ) from exc
        except psycopg.Error as exc:
            raise DatabaseUnavailable(
                f"cannot LISTEN on {self.url.masked()}: {first_line(exc)}"
            ) from exc
        self._conn = conn

    def fileno(self) -> int:
        """The socket to watch; connects first if needed."""
        if not self.connected:
            self.connect()
        assert self._conn is not None
        return self._conn.pgconn.socket

    def drain(self) -> list[tuple[str, str]]:
        """Notifications already received, as ``(channel, payload)``; never blocks."""
        with self._lock:
            conn = self._conn
            if conn is None or conn.closed:
                raise DatabaseUnavailable(f"LISTEN connection to {self.url.masked()} is closed")
            pgconn = conn.pgconn
            try:
                pgconn.consume_input()
            except psycopg.OperationalError as exc:
                self.close()
                raise DatabaseUnavailable(
                    f"LISTEN connection to {self.url.masked()} dropped: {exc}"
                ) from exc
            if pgconn.status != psycopg.pq.ConnStatus.OK:
                self.close()
                raise DatabaseUnavailable(f"LISTEN connection to {self.url.masked()} dropped")
            received: list[tuple[str, str]] = []
            while (note := pgconn.notifies()) is not None:
                received.append((note.relname.decode(), note.extra.decode()))
            return received

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """Block up to ``timeout`` seconds for notifications."""
        fd = self.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        return self.drain() if ready else []

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            try:
                conn.close()
            except Exception:  # closing a broken socket must not raise
                pass

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's socket without closing it."""
        self._conn = None
