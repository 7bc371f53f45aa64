"""The engine and pool of one database and schema, shared by every role of a process."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import sqlalchemy as sa

from celery_pgqueue.errors import ConfigurationError
from celery_pgqueue.options import DatabaseURL, PgQueueOptions, pool_conflict
from celery_pgqueue.store.borrowed import Lender
from celery_pgqueue.store.hot import HotPath
from celery_pgqueue.store.notify import Channels
from celery_pgqueue.store.wakeups import Wakeups


class Pool:
    """One engine and its pool for a database and schema, and what it learnt of the schema.

    Shared by every role of a process that names the same database and schema. It is
    made with the options of the first role; of those only :data:`POOL_OPTIONS` (and
    the sessions' default ``synchronous_commit``) matter to it.
    """

    # Every pool, shared or not, must drop its sockets in a forked child.
    _instances: weakref.WeakSet[Pool] = weakref.WeakSet()

    def __init__(self, url: DatabaseURL, options: PgQueueOptions) -> None:
        self.url = url
        self.options = options
        self.known_queues: set[str] = set()
        # Queues the last claim found with a concurrency limit: claimed under its lock.
        self.limited_queues: set[str] = set()
        self.schema_checked = False
        self.channels: Channels | None = None
        self.lender: Lender | None = None
        # Wake-ups owed by this process's publishes (store.wakeups), made on first use.
        self.wakeups: Wakeups | None = None
        self.lock = threading.Lock()
        # The role views on this pool, one per distinct set of options.
        self.stores: dict[PgQueueOptions, Any] = {}
        Pool._instances.add(self)
        execution_options: dict[str, Any] = {}
        if options.schema != "public":
            execution_options["schema_translate_map"] = {None: options.schema}
        self.engine = sa.create_engine(
            url.sqlalchemy_url(),
            pool_size=options.pool_size,
            max_overflow=options.max_overflow,
            pool_timeout=options.pool_timeout,
            # No pre-ping: it costs a round trip per checkout. A dropped connection
            # surfaces as DatabaseUnavailable and the pool discards it.
            pool_reset_on_return="rollback",
            connect_args=self.connect_args(),
            execution_options=execution_options,
        )
        # Single-statement methods run in autocommit: the statement is its own
        # transaction, which saves the BEGIN and COMMIT round trips.
        self.autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # Per-task statements (publish, claim, finish) skip SQLAlchemy's per-call work.
        self.hot = HotPath(self.engine, self.autocommit)

    @property
    def synchronous_commit(self) -> bool:
        """The sessions' own setting; a role that wants the other sets it per transaction."""
        return self.options.synchronous_commit

    def connect_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"connect_timeout": max(1, round(self.options.connect_timeout))}
        if "application_name" not in dict(self.url.query):
            # Keyword arguments override the URL's: set ours only as the default, so
            # pg_stat_activity shows the name a user gave (to tell workers apart).
            args["application_name"] = "celery-pgqueue"
        if not self.options.prepared_statements:
            # A pooler may hand the next transaction another server session, where
            # a statement prepared on this one does not exist (or collides).
            args["prepare_threshold"] = None
        if not self.options.synchronous_commit:
            # Only our own sessions: the application's connections keep their setting.
            args["options"] = "-c synchronous_commit=off"
        return args

    def check_agrees(self, options: PgQueueOptions) -> None:
        """Refuse a role whose pool-level options differ from this pool's, naming both."""
        conflict = pool_conflict(self.options, options)
        if conflict is not None:
            name, ours, theirs = conflict
            raise ConfigurationError(
                f"pgqueue option {name!r} is {theirs!r} here but {ours!r} for the "
                f"connection pool this process already opened on {self.url.masked()} "
                f"(schema {self.options.schema!r}); the broker and the result backend "
                f"of one database share that pool, so give {name} the same value in "
                "broker_transport_options and result_backend_transport_options"
            )

    def dispose(self) -> None:
        """Close every pooled connection (the pool stays usable and reconnects)."""
        self.engine.dispose()
