"""The connection core every role of the Store stands on.

Pools, the process's registry of them, fork handling, one transaction per call (or
the caller's own connection, lent), driver errors translated once into
:mod:`celery_pgqueue.errors`, retries of a settled outcome across a server restart,
and the per-task statements run on the hot path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Self, TypeVar, cast

import sqlalchemy as sa

from celery_pgqueue.errors import (
    MIGRATE_HINT,
    DatabaseUnavailable,
    PgQueueError,
    SchemaMissing,
)
from celery_pgqueue.options import DatabaseURL, PgQueueOptions
from celery_pgqueue.store import queries
from celery_pgqueue.store import schema as schema_sql
from celery_pgqueue.store.borrowed import Lender
from celery_pgqueue.store.hot import Call, Row
from celery_pgqueue.store.notify import Channels
from celery_pgqueue.store.pool import Pool
from celery_pgqueue.store.refusal import connection_failure

T = TypeVar("T")
logger = logging.getLogger("celery_pgqueue")

#: How long the outcome of a finished task keeps retrying while PostgreSQL is
#: unreachable: about a restart or a failover. If it still fails, the row stays
#: running until its lease lapses and rescue reads it as a lost worker.
SETTLE_RETRY_SECONDS = 30.0


class Connections:
    """The connection handling of a :class:`~celery_pgqueue.store.Store`, for one role.

    ``options`` are the role's (the broker's, the backend's); the connections come
    from ``pool``, by default a private one. :meth:`for_url` gives the process's
    shared pool instead.
    """

    _registry: dict[tuple[str, str], Pool] = {}
    _registry_lock = threading.Lock()

    def __init__(
        self,
        url: str | DatabaseURL,
        options: PgQueueOptions | None = None,
        *,
        pool: Pool | None = None,
    ) -> None:
        self.options = options or PgQueueOptions()
        if pool is None:
            parsed = url if isinstance(url, DatabaseURL) else DatabaseURL.parse(url)
            pool = Pool(parsed, self.options)
        self.pool = pool
        self.url = pool.url
        self.engine = pool.engine
        self._known_queues = pool.known_queues
        self._limited_queues = pool.limited_queues
        self._autocommit = pool.autocommit
        self._hot = pool.hot
        # The per-task statements' text for this schema (see queries.py).
        self.queries = queries.for_schema(pool.options.schema)
        # synchronous_commit is the role's: when it differs from what the pool's
        # sessions have, this role sets its own for each of its transactions.
        self._settings: tuple[tuple[str, str], ...] = ()
        if self.options.synchronous_commit != pool.synchronous_commit:
            wanted = "on" if self.options.synchronous_commit else "off"
            self._settings = (("synchronous_commit", wanted),)

    @property
    def channel(self) -> str:
        """The channel that wakes workers (payload: a queue name); see ``job_channels``."""
        return (self.pool.channels or self._read_channels()).queues

    @property
    def result_channel(self) -> str:
        """The channel that wakes result waiters (payload: a job id, maybe its result)."""
        return (self.pool.channels or self._read_channels()).results

    def _read_channels(self) -> Channels:
        with self.begin() as conn:
            return self._learn_channels(conn)

    def _learn_channels(self, conn: sa.Connection) -> Channels:
        where = f"{self.url.masked()} (schema {self.options.schema!r})"
        channels = Channels.from_rows(schema_sql.channel_names(conn), where)
        self.pool.channels = channels
        return channels

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    def for_url(cls, url: str | DatabaseURL, options: PgQueueOptions | None = None) -> Self:
        """This role's view on the process's shared pool for the database and schema.

        The pool is made once, by the first caller; later callers must agree on its
        :data:`POOL_OPTIONS` (ConfigurationError otherwise) and get a view with their
        own options. Without ``options``: the view of whoever opened the pool.
        """
        parsed = url if isinstance(url, DatabaseURL) else DatabaseURL.parse(url)
        wanted = options or PgQueueOptions()
        key = (parsed.key(), wanted.schema)
        with cls._registry_lock:
            pool = cls._registry.get(key)
            if pool is None:
                pool = cls._registry[key] = Pool(parsed, wanted)
            elif options is None:
                wanted = pool.options
            store = pool.stores.get(wanted)
            if store is None:
                pool.check_agrees(wanted)
                store = pool.stores[wanted] = cls(parsed, wanted, pool=pool)
            return cast(Self, store)

    @classmethod
    def close_all(cls) -> None:
        """Close and forget every shared store of this process (tests, before dropping
        a database; the next :meth:`for_url` builds a new one)."""
        with cls._registry_lock:
            stores = list(cls._registry.values())
            cls._registry.clear()
        for store in stores:
            store.dispose()

    @classmethod
    def _after_fork_in_child(cls) -> None:
        # A forked child must never use the parent's sockets: drop them without
        # closing (closing would end the parent's sessions too). A parent's thread
        # may have held a registry lock at the fork: the child gets new ones.
        Connections._registry_lock = threading.Lock()
        for pool in list(Pool._instances):
            pool.lock = threading.Lock()
            pool.engine.dispose(close=False)

    def dispose(self) -> None:
        """Close every pooled connection (the store stays usable and reconnects)."""
        self.pool.dispose()

    @contextlib.contextmanager
    def begin(self, conn: sa.Connection | None = None) -> Iterator[sa.Connection]:
        """A transaction: the caller's ``conn`` if given, else a short one of ours."""
        if conn is not None:
            with self.translating():
                yield conn
            return
        with self.translating(), self.engine.begin() as own:
            for name, value in self._settings:
                schema_sql.set_local(own, name=name, value=value)
            yield own

    @contextlib.contextmanager
    def single(self, conn: sa.Connection | None = None) -> Iterator[sa.Connection]:
        """For one statement: the caller's ``conn`` if given, else autocommit.

        A role whose session settings differ from the pool's needs a transaction to
        hold them: it gets one.
        """
        if conn is not None:
            with self.translating():
                yield conn
            return
        if self._settings:
            with self.begin() as own:
                yield own
            return
        with self.translating(), self._autocommit.connect() as own:
            yield own

    @contextlib.contextmanager
    def translating(self) -> Iterator[None]:
        """Turn driver errors into celery-pgqueue errors, naming the fix."""
        try:
            yield
        except PgQueueError:
            raise
        except sa.exc.ProgrammingError as exc:
            sqlstate = getattr(exc.orig, "sqlstate", None)
            if sqlstate in ("42P01", "3F000", "42703"):  # undefined table/schema/column
                raise SchemaMissing(
                    f"the celery-pgqueue tables are missing or outdated in "
                    f"{self.url.masked()} (schema {self.options.schema!r}): {MIGRATE_HINT}"
                ) from exc
            raise
        except sa.exc.TimeoutError as exc:
            raise DatabaseUnavailable(
                f"no free connection to {self.url.masked()} within "
                f"{self.options.pool_timeout}s (pool_size={self.options.pool_size}, "
                f"max_overflow={self.options.max_overflow})"
            ) from exc
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            if getattr(exc, "connection_invalidated", False) is False and isinstance(
                exc, sa.exc.OperationalError
            ):
                sqlstate = getattr(exc.orig, "sqlstate", None)
                if sqlstate and not sqlstate.startswith(("08", "57P", "53")):
                    raise
            raise connection_failure(
                exc.orig or exc, self.url, self.options.connect_timeout
            ) from exc

    def lend(self, raw: Any) -> sa.Connection:
        """A Connection running on a caller's psycopg connection, inside its transaction.

        Closing it leaves the caller's connection and transaction as they were.
        """
        pool = self.pool
        with pool.lock:
            if pool.lender is None:
                with self.translating():
                    pool.lender = Lender(
                        self.url, pool.connect_args(), self.engine.get_execution_options()
                    )
        return pool.lender.lend(raw)

    def retrying(self, write: Callable[[], T], *, what: str) -> T:
        """Run ``write`` (fenced and idempotent), retrying while the server is unreachable.

        For the outcome of a task that has run: worth waiting out a restart or a
        failover (:data:`SETTLE_RETRY_SECONDS`) rather than dropping. The first retry
        is immediate: after a restart the pool still holds sessions the server closed,
        and the failure that reveals one discards them all.
        """
        deadline = time.monotonic() + SETTLE_RETRY_SECONDS
        delay = 0.0
        while True:
            try:
                return write()
            except DatabaseUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                if delay:
                    logger.info("pgqueue retrying %s: %s", what, exc)
                time.sleep(delay)
                delay = min(max(delay * 2, 0.1), 1.0)

    def identity(self, conn: sa.Connection | None = None) -> tuple[str, str]:
        """Which database a connection (ours if None) is on: name and server start."""
        with self.begin(conn) as c:
            return schema_sql.server_identity(c)

    def check_schema(self, *, round_trip: bool = False) -> None:
        """Fail fast, naming the migrate command, when the tables are missing or old.

        Checked once per store; ``round_trip``: still ask the server something after
        that, so an unreachable one raises DatabaseUnavailable (a reconnect's test).
        """
        if self.pool.schema_checked:
            if round_trip:
                with self.single() as conn:
                    schema_sql.ping(conn)
            return
        head = schema_sql.REQUIRED_REVISION
        with self.begin() as conn:
            current = schema_sql.current_revision(conn, schema=self.options.schema)
            if current is not None and current >= head:
                self._learn_channels(conn)
        if current is None:
            raise SchemaMissing(
                f"the celery-pgqueue tables are missing in {self.url.masked()} "
                f"(schema {self.options.schema!r}): {MIGRATE_HINT}"
            )
        # Revision ids are zero-padded numbers; a newer schema is fine (migrate first,
        # then roll out workers), an older one lacks what this code uses.
        if current < head:
            raise SchemaMissing(
                f"the celery-pgqueue tables in {self.url.masked()} are at revision "
                f"{current}, this version needs {head}: {MIGRATE_HINT}"
            )
        self.pool.schema_checked = True

    # -- per-task statements ------------------------------------------------------

    def rows(self, call: Call, after: Call | None = None) -> list[Row]:
        """Run one per-task statement on our own connection, in autocommit.

        ``after``: run first, in the same transaction and round trip (a lock).
        """
        with self.translating():
            return self._hot.rows(call, self._settings, after)

    def rowcount(self, call: Call) -> int:
        """Run one per-task statement without rows (our connection, autocommit): rows changed."""
        with self.translating():
            return self._hot.rowcount(call, self._settings)

    def first(self, call: Call) -> Row | None:
        """The first row of :meth:`rows`, or None."""
        rows = self.rows(call)
        return rows[0] if rows else None

    def _drain(self, step: Any, batch: int, dry_run: bool, max_batches: int) -> int:
        total = 0
        for _ in range(1 if dry_run else max_batches):
            with self.begin() as conn:
                n = int(step(conn))
            total += n
            if n < batch:
                break
        return total


os.register_at_fork(after_in_child=Connections._after_fork_in_child)
