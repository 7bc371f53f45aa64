"""The one data-access layer: every statement celery-pgqueue runs goes through here.

A process keeps one engine, one bounded pool (:class:`Pool`), per database and schema,
shared by the transport, the result backend and the operator API. Each of them sees it
through its own :class:`Store`, which carries that role's options: the broker's
``lease_seconds`` or ``use_notify`` govern broker work, the backend's govern backend
work, whichever role opened the pool. Only the pool's own settings
(:data:`~celery_pgqueue.options.POOL_OPTIONS`) must agree. Each public method is one
short transaction (or runs on a connection the caller passes, so a caller can enqueue
inside its own transaction). Driver errors become :mod:`celery_pgqueue.errors` here,
once.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import sqlalchemy as sa

from celery_pgqueue.errors import (
    MIGRATE_HINT,
    ConfigurationError,
    DatabaseUnavailable,
    InvalidQueueName,
    PgQueueError,
    SchemaMissing,
    UnknownQueue,
)
from celery_pgqueue.options import DatabaseURL, PgQueueOptions, pool_conflict
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import bindings as binding_sql
from celery_pgqueue.store import groups as group_sql
from celery_pgqueue.store import jobs as job_sql
from celery_pgqueue.store import locks as lock_sql
from celery_pgqueue.store import logs as log_sql
from celery_pgqueue.store import queues as queue_sql
from celery_pgqueue.store import results as result_sql
from celery_pgqueue.store import schema as schema_sql
from celery_pgqueue.store import views as view_sql
from celery_pgqueue.store.borrowed import Lender
from celery_pgqueue.store.groups import ChordPart
from celery_pgqueue.store.hot import Call, HotPath, Row
from celery_pgqueue.store.notify import Channels, ResultListener
from celery_pgqueue.store.records import (
    AttemptRecord,
    ClaimedJob,
    JobRecord,
    NewJob,
    PruneCounts,
    QueueStatus,
    RunningJob,
)
from celery_pgqueue.store.refusal import connection_failure
from celery_pgqueue.store.results import StateWrite, StoredResult

__all__ = [
    "AttemptRecord",
    "ClaimedJob",
    "JobRecord",
    "NewJob",
    "Pool",
    "PruneCounts",
    "Store",
    "connection_failure",
]

MAX_QUEUE_NAME = 100
MAX_QUEUES_SHOWN = 20  # in the error for an unknown queue

#: How long the outcome of a finished task keeps retrying while PostgreSQL is
#: unreachable: about a restart or a failover. If it still fails, the row stays
#: running until its lease lapses and rescue reads it as a lost worker.
SETTLE_RETRY_SECONDS = 30.0

T = TypeVar("T")
logger = logging.getLogger("celery_pgqueue")


def check_queue_name(name: str) -> str:
    """Queue names are values in ``job_queues.name``: 1-100 characters, no NUL."""
    if not isinstance(name, str) or not name or len(name) > MAX_QUEUE_NAME or "\x00" in name:
        shown = name if not isinstance(name, str) else name[:40] + ("…" if len(name) > 40 else "")
        raise InvalidQueueName(
            f"queue name {shown!r} is not allowed: use 1 to {MAX_QUEUE_NAME} characters "
            f"without NUL (got {len(name) if isinstance(name, str) else type(name).__name__})"
        )
    return name


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
        self.schema_checked = False
        self.channels: Channels | None = None
        self.lender: Lender | None = None
        self.lock = threading.Lock()
        # The role views on this pool, one per distinct set of options.
        self.stores: dict[PgQueueOptions, Store] = {}
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


class Store:
    """Every read and write of the tier, for one database URL and schema, as one role.

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
        self._autocommit = pool.autocommit
        self._hot = pool.hot
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
    def for_url(cls, url: str | DatabaseURL, options: PgQueueOptions | None = None) -> Store:
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
            return store

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
        cls._registry_lock = threading.Lock()
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

    # -- queues ---------------------------------------------------------------------

    def ensure_queues(self, names: Sequence[str], conn: sa.Connection | None = None) -> None:
        """Create queues on first use (default priority from the options).

        Names are remembered only once our own transaction committed: a caller's
        transaction may still roll the new queue back.
        """
        if conn is not None:
            checked = [check_queue_name(n) for n in names]
            with self.begin(conn) as c:
                queue_sql.ensure(c, names=checked, default_priority=self.options.default_priority)
            return
        missing = [check_queue_name(n) for n in names if n not in self._known_queues]
        if not missing:
            return
        with self.begin() as c:
            queue_sql.ensure(c, names=missing, default_priority=self.options.default_priority)
        self._known_queues.update(missing)

    def set_queue_active(self, name: str, active: bool) -> None:
        """Pause or resume a queue; resuming wakes the workers."""
        with self.begin() as conn:
            if not queue_sql.set_active(conn, name=name, active=active):
                raise self.unknown_queue(name)
            if active and self.options.use_notify:
                schema_sql.notify(conn, channel=self.channel, payload=name)

    def set_queue_priority(self, name: str, priority: int) -> None:
        """Set the ``default_priority`` of a queue's jobs that name none."""
        with self.begin() as conn:
            if not queue_sql.set_default_priority(conn, name=name, priority=priority):
                raise self.unknown_queue(name)

    def queue(self, name: str) -> dict[str, Any]:
        """A queue's settings, or UnknownQueue."""
        with self.begin() as conn:
            row = queue_sql.get(conn, name=name)
        if row is None:
            raise self.unknown_queue(name)
        return dict(row._mapping)

    def unknown_queue(self, name: str) -> UnknownQueue:
        """The error for a queue that does not exist, naming those that do."""
        with self.begin() as conn:
            existing = queue_sql.names(conn)
        if not existing:
            return UnknownQueue(f"no queue named {name!r} (there are no queues yet)")
        near = difflib.get_close_matches(name, existing, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        shown = ", ".join(repr(n) for n in existing[:MAX_QUEUES_SHOWN])
        if len(existing) > MAX_QUEUES_SHOWN:
            shown += f" and {len(existing) - MAX_QUEUES_SHOWN} more"
        return UnknownQueue(f"no queue named {name!r}{hint} (queues: {shown})")

    def queues(self) -> list[dict[str, Any]]:
        """Every queue's settings."""
        with self.begin() as conn:
            return [dict(r._mapping) for r in queue_sql.list_all(conn)]

    # -- jobs: the broker's hot path ------------------------------------------------

    def enqueue(self, new_jobs: Sequence[NewJob], conn: sa.Connection | None = None) -> int:
        """Insert jobs in one statement; workers are woken when it commits."""
        if not new_jobs:
            return 0
        names = sorted({j.queue_name for j in new_jobs})
        self.ensure_queues(names, conn)
        channel = self.channel if self.options.use_notify else None
        if conn is not None:
            with self.single(conn) as c:
                return job_sql.insert(c, new_jobs=new_jobs, channel=channel)
        call = job_sql.insert_call(new_jobs=new_jobs, channel=channel)
        try:
            row = self.first(call)
        except sa.exc.IntegrityError as exc:
            # A queue we remembered was dropped by another process: create it again.
            if "fk_jobs_queue_name" not in str(exc.orig):
                raise
            self._known_queues.difference_update(names)
            self.ensure_queues(names)
            row = self.first(call)
        return int(row[0]) if row else 0

    def rows(self, call: Call) -> list[Row]:
        """Run one per-task statement on our own connection, in autocommit."""
        with self.translating():
            return self._hot.rows(call, self._settings)

    def first(self, call: Call) -> Row | None:
        """The first row of :meth:`rows`, or None."""
        rows = self.rows(call)
        return rows[0] if rows else None

    def claim(
        self,
        queue_name: str,
        limit: int,
        owner: str,
        acked: Sequence[tuple[UUID, int]] = (),
    ) -> list[ClaimedJob]:
        """Take up to ``limit`` due jobs of an active queue under a lease for ``owner``.

        ``acked`` deliveries are marked acked in the same statement.
        """
        call = job_sql.claim_call(
            queue_name=queue_name,
            limit=limit,
            owner=owner,
            lease_seconds=self.options.lease_seconds,
            acked=acked,
        )
        return [ClaimedJob(*row) for row in self.rows(call)]

    def mark_acked(self, held: Sequence[tuple[UUID, int]]) -> int:
        """Record that these deliveries were acked before their task finished."""
        if not held:
            return 0
        with self.single() as conn:
            return job_sql.mark_acked(conn, held=held)

    def requeue(self, held: Sequence[tuple[UUID, int]]) -> int:
        """Put held deliveries back in line at once (reject/requeue, shutdown)."""
        if not held:
            return 0
        channel = self.channel if self.options.use_notify else None
        with self.single() as conn:
            return job_sql.requeue(conn, held=held, channel=channel)

    # -- routing (exchanges, bindings, queue expiry) --------------------------------

    def bind(self, exchange: str, exchange_type: str, routing_key: str, queue_name: str) -> None:
        """Persist a binding so every process routes the same way."""
        self.ensure_queues([queue_name])
        with self.begin() as conn:
            binding_sql.bind(
                conn,
                exchange=exchange,
                exchange_type=exchange_type,
                routing_key=routing_key,
                queue_name=queue_name,
            )

    def unbind(self, exchange: str, routing_key: str, queue_name: str) -> None:
        """Forget one binding."""
        with self.begin() as conn:
            binding_sql.unbind(
                conn, exchange=exchange, routing_key=routing_key, queue_name=queue_name
            )

    def binding_table(self, exchange: str) -> list[tuple[str, str, str]]:
        """``(exchange_type, routing_key, queue_name)`` for each binding of ``exchange``."""
        with self.begin() as conn:
            return [tuple(r) for r in binding_sql.table(conn, exchange=exchange)]

    def set_queue_message_ttl(self, name: str, seconds: float) -> None:
        """Messages published to ``name`` from now on expire after ``seconds`` waiting."""
        with self.begin() as conn:
            queue_sql.set_message_ttl(conn, name=name, seconds=seconds)

    def touch_queues(self, expiries: Sequence[tuple[str, float]]) -> None:
        """Keep queues with an expiry alive while they are consumed."""
        if not expiries:
            return
        with self.begin() as conn:
            binding_sql.touch_queues(conn, expiries=expiries)

    def delete_queue(self, name: str) -> bool:
        """Drop a queue, its waiting messages and its bindings."""
        self._known_queues.discard(name)
        with self.begin() as conn:
            return binding_sql.delete_queue(conn, name=name)

    def queue_exists(self, name: str) -> bool:
        """Whether a queue has been declared."""
        with self.begin() as conn:
            return binding_sql.queue_exists(conn, name=name)

    def finish(
        self,
        job_id: UUID,
        *,
        attempt: int | None,
        status: JobStatus,
        log_status: LogStatus | None,
        error_message: str | None = None,
        log_message: str | None = None,
        result: Any = None,
        max_attempts: int | None = None,
        run_at: Any = None,
        conn: sa.Connection | None = None,
    ) -> bool:
        """Move one job to ``status``, closing its attempt; False if fenced out."""
        call = job_sql.finish_call(
            job_id=job_id,
            attempt=attempt,
            status=status,
            log_status=log_status,
            error_message=error_message,
            log_message=log_message,
            result=result,
            max_attempts=max_attempts,
            run_at=run_at,
        )
        if conn is not None:
            with self.single(conn) as c:
                row = call.first(c)
        else:
            row = self.first(call)
        return bool(row and row[0])

    def heartbeat(self, owner: str, job_ids: Sequence[UUID]) -> int:
        """Extend the leases ``owner`` holds on ``job_ids``."""
        if not job_ids:
            return 0
        with self.single() as conn:
            return job_sql.heartbeat(
                conn, owner=owner, job_ids=job_ids, lease_seconds=self.options.lease_seconds
            )

    def delete_held(self, held: Sequence[tuple[UUID, int]]) -> int:
        """Remove consumed messages that are not tasks."""
        if not held:
            return 0
        with self.single() as conn:
            return job_sql.delete_held(conn, held=held)

    def rescue_expired(
        self, limit: int = 1000, *, spare: tuple[str, Sequence[UUID]] | None = None
    ) -> tuple[int, int]:
        """Requeue (or fail, if acked early) running jobs whose lease ran out.

        ``spare``: ``(owner, job ids)`` the calling process still holds; never taken.
        """
        channel = self.channel if self.options.use_notify else None
        results = self.result_channel if self.options.use_notify else None
        with self.begin() as conn:
            return job_sql.rescue_expired(
                conn, limit=limit, channel=channel, result_channel=results, spare=spare
            )

    def cancel(self, job_ids: Sequence[UUID], *, revoked: bool = False) -> int:
        """Durably cancel jobs that have not started; waiting ``get()`` calls wake up.

        ``revoked``: Celery's ``revoke()`` asked, so workers remember these ids too.
        """
        results = self.result_channel if self.options.use_notify else None
        reason = job_sql.REVOKED_MESSAGE if revoked else None
        with self.begin() as conn:
            return job_sql.cancel(conn, job_ids=job_ids, result_channel=results, reason=reason)

    def revoked_jobs(self, job_ids: Sequence[UUID]) -> dict[UUID, str]:
        """Which of these cancelled jobs Celery revoked, or expired: ``id -> why``.

        Workers keep revoked (and expired) task ids and drop such a message on sight,
        so putting one back in line would only see it cancelled again.
        """
        with self.begin() as conn:
            rows = job_sql.cancel_reasons(conn, job_ids=job_ids)
        found: dict[UUID, str] = {}
        for job_id, error, last_log in rows:
            for text in (last_log, error):
                if text in ("revoked", "expired"):
                    found[job_id] = text
                elif text and text.startswith("TaskRevokedError"):
                    found[job_id] = "expired" if "expired" in text else "revoked"
                else:
                    continue
                break
        return found

    def job_ids_with_prefix(self, prefix: str, limit: int = 10) -> list[UUID]:
        """Up to ``limit`` job ids starting with ``prefix`` (hex digits, dashes ignored)."""
        digits = prefix.replace("-", "").lower()
        low = UUID(digits.ljust(32, "0"))
        high = UUID(digits.ljust(32, "f"))
        with self.begin() as conn:
            return job_sql.ids_between(conn, low=low, high=high, limit=limit)

    def retry(self, job_ids: Sequence[UUID]) -> int:
        """Failed or cancelled jobs back to queued now."""
        channel = self.channel if self.options.use_notify else None
        with self.begin() as conn:
            return job_sql.retry(conn, job_ids=job_ids, channel=channel)

    def purge(self, queue_name: str) -> int:
        """Delete a queue's waiting jobs."""
        with self.begin() as conn:
            return job_sql.purge(conn, queue_name=queue_name)

    def count_waiting(self, queue_name: str) -> int:
        """Queued jobs in a queue, due or scheduled."""
        with self.begin() as conn:
            return job_sql.count_waiting(conn, queue_name=queue_name)

    def delete(self, job_ids: Sequence[UUID]) -> int:
        """Remove jobs and their logs."""
        with self.begin() as conn:
            return job_sql.delete(conn, job_ids=job_ids)

    def job(self, job_id: UUID) -> JobRecord | None:
        """One job, or None."""
        with self.begin() as conn:
            row = job_sql.get(conn, job_id=job_id)
        return JobRecord(**row._mapping) if row else None

    def attempts(self, job_id: UUID) -> list[AttemptRecord]:
        """A job's ``job_logs`` rows, oldest first."""
        with self.begin() as conn:
            rows = log_sql.for_job(conn, job_id=job_id)
        return [AttemptRecord(*row) for row in rows]  # type: ignore[call-arg]

    # -- retention ------------------------------------------------------------------

    def prune(
        self, *, completed_retention: float, dry_run: bool = False, max_batches: int = 10_000
    ) -> PruneCounts:
        """Delete expired finished jobs and old logs in short batches."""
        if dry_run:
            return self.prunable(completed_retention=completed_retention)
        opts = self.options
        batch = opts.prune_batch_size
        plan = (
            ("completed", JobStatus.COMPLETED, completed_retention),
            ("cancelled", JobStatus.CANCELLED, completed_retention),
            ("failed", JobStatus.FAILED, opts.failed_retention),
        )
        totals: dict[str, int] = {}
        for name, status, older_than in plan:
            totals[name] = self._drain(
                lambda c, s=status, o=older_than: job_sql.prune_finished(
                    c, status=s, older_than=o, limit=batch, dry_run=dry_run
                ),
                batch,
                dry_run,
                max_batches,
            )
        totals["logs"] = self._drain(
            lambda c: log_sql.prune_old(
                c, older_than=opts.log_retention, limit=batch, dry_run=dry_run
            ),
            batch,
            dry_run,
            max_batches,
        ) + self._drain(
            lambda c: log_sql.prune_excess(
                c, keep=opts.max_logs_per_job, limit=batch, dry_run=dry_run
            ),
            batch,
            dry_run,
            max_batches,
        )
        return PruneCounts(**totals)

    def _drain(self, step: Any, batch: int, dry_run: bool, max_batches: int) -> int:
        total = 0
        for _ in range(1 if dry_run else max_batches):
            with self.begin() as conn:
                n = int(step(conn))
            total += n
            if n < batch:
                break
        return total

    # -- operations (CLI, maintenance) ----------------------------------------------

    def queue_status(self, *, include_transient: bool = False) -> list[QueueStatus]:
        """Every queue's depth, ages and throughput, read from the operator views.

        Queues with an expiry (Celery's mailboxes and reply queues) are left out unless
        ``include_transient``.
        """
        with self.begin() as conn:
            rows = view_sql.queue_status(conn, include_transient=include_transient)
        return [QueueStatus(**row._mapping) for row in rows]

    def running_jobs(self, limit: int = 20) -> list[RunningJob]:
        """Running jobs with their lease, longest running first (view ``job_running``)."""
        with self.begin() as conn:
            return [RunningJob(**row._mapping) for row in view_sql.running(conn, limit=limit)]

    def find_jobs(
        self,
        *,
        queues: Sequence[str] = (),
        statuses: Sequence[JobStatus] = (),
        task: str | None = None,
        changed_within: float | None = None,
        changed_since: datetime | None = None,
        scheduled: bool = False,
        limit: int = 50,
    ) -> list[JobRecord]:
        """Jobs matching every filter given, most recently changed first.

        ``scheduled``: only waiting jobs not due yet, soonest first.
        """
        with self.begin() as conn:
            rows = job_sql.find(
                conn,
                queues=queues,
                statuses=statuses,
                task=task,
                changed_within=changed_within,
                changed_since=changed_since,
                scheduled=scheduled,
                limit=limit,
            )
        return [JobRecord(**row._mapping) for row in rows]

    def job_statuses(self, job_ids: Sequence[UUID]) -> dict[UUID, str]:
        """The status of each id that exists; unknown ids are absent."""
        with self.begin() as conn:
            return job_sql.statuses(conn, job_ids=job_ids)

    def prunable(self, *, completed_retention: float) -> PruneCounts:
        """Exactly what :meth:`prune` would delete now, not capped at one batch."""
        opts = self.options
        with self.begin() as conn:
            jobs = {
                name: job_sql.count_prunable(conn, status=status, older_than=older_than)
                for name, status, older_than in (
                    ("completed", JobStatus.COMPLETED, completed_retention),
                    ("cancelled", JobStatus.CANCELLED, completed_retention),
                    ("failed", JobStatus.FAILED, opts.failed_retention),
                )
            }
            logs = log_sql.count_prunable(
                conn,
                older_than=opts.log_retention,
                keep=opts.max_logs_per_job,
                doomed_jobs=job_sql.is_prunable(
                    completed_retention=completed_retention,
                    failed_retention=opts.failed_retention,
                ),
            )
        return PruneCounts(logs=logs, **jobs)

    def drop_expired_messages(self, limit: int | None = None) -> int:
        """Delete waiting transient messages whose TTL has passed (one batch)."""
        with self.begin() as conn:
            return job_sql.drop_expired(conn, limit=limit or self.options.prune_batch_size)

    def expire_tasks(self, job_ids: Sequence[UUID] | None = None, limit: int | None = None) -> int:
        """Record queued tasks past their ``expires`` as cancelled (REVOKED), one batch.

        ``job_ids``: only those (a client waiting on them); else any. Waiting ``get()``
        calls are woken.
        """
        results = self.result_channel if self.options.use_notify else None
        with self.single() as conn:
            return job_sql.expire_tasks(
                conn,
                limit=limit or self.options.prune_batch_size,
                job_ids=job_ids,
                result_channel=results,
            )

    def seconds_to_expiry(self, job_ids: Sequence[UUID]) -> dict[UUID, float]:
        """Seconds until each still-queued task of ``job_ids`` expires (database clock)."""
        with self.single() as conn:
            return job_sql.seconds_to_expiry(conn, job_ids=job_ids)

    def next_due(self, queue_names: Sequence[str], came_due_within: float = 0.0) -> float | None:
        """Seconds until the soonest scheduled job of these queues comes due, or None.

        ``came_due_within``: count jobs that came due that many seconds ago too (the
        answer is then negative): those a claim just before may have missed.
        """
        with self.single() as conn:
            return job_sql.next_due(conn, queue_names=queue_names, came_due_within=came_due_within)

    def drop_expired_queues(self, limit: int | None = None) -> tuple[int, int]:
        """Drop queues past their ``x-expires`` with their waiting messages (one batch).

        Returns (queues, messages). A queue that still has running or finished jobs
        stays until retention has removed them.
        """
        batch = limit or self.options.prune_batch_size
        with self.begin() as conn:
            expired = queue_sql.expired(conn, limit=batch)
            if not expired:  # the usual pass: one look at the small job_queues table
                return 0, 0
            messages = 0
            for name in expired:
                messages += job_sql.drop_waiting(conn, queue_name=name, limit=batch)
            names = queue_sql.drop_expired(conn, limit=batch)
        self._known_queues.difference_update(names)
        return len(names), messages

    @contextlib.contextmanager
    def advisory_lock(self, purpose: str) -> Iterator[bool]:
        """Hold an advisory lock for ``purpose`` in this schema, if it is free.

        Yields whether this process got it; the caller does the work only then. The
        lock belongs to a transaction kept open on a pooled connection for the block
        (the work itself uses other connections, in short transactions); the
        rollback at the end releases it, even behind PgBouncer (see ``locks.py``).
        """
        key = lock_sql.key_for(purpose, self.options.schema)
        with self.translating():
            conn = self.engine.connect()
            try:
                conn.begin()
                held = lock_sql.try_lock(conn, key=key)
            except BaseException:
                conn.close()
                raise
        try:
            yield held
        finally:
            # Closing rolls the transaction back, which releases the lock. If that fails
            # the connection broke, and the server ended the session and its lock.
            with contextlib.suppress(sa.exc.DBAPIError):
                conn.close()

    # -- results (backend) ----------------------------------------------------------
    # Celery's result backend: task state in the job's own row, attempts in job_logs,
    # groups and chord counters in job_groups. Each method is one autocommit statement.

    def write_state(self, write: StateWrite, *, notify: bool) -> bool:
        """Record one state transition of a task; False when fenced out.

        A row the pgqueue transport made is updated only at the attempt it delivered
        (:func:`jobs.finish`); otherwise the row and its attempt's log row are created
        or updated here; either way in one statement. ``notify`` and a ready state:
        waiting clients are woken by a NOTIFY on :attr:`result_channel` sent by that
        statement, so it fires at its commit and only if the row changed.
        """
        if write.transport_owned:
            row = self.first(
                job_sql.finish_call(
                    job_id=write.job_id,
                    attempt=write.attempt,
                    status=write.status,
                    log_status=write.log_status,
                    error_message=write.error_message,
                    log_message=write.log_message,
                    result=write.document,
                    max_attempts=write.max_attempts,
                    result_channel=self.result_channel if notify and write.ready else None,
                )
            )
            return bool(row and row[0])
        self.ensure_queues([write.queue_name])
        with self.single() as conn:
            return result_sql.upsert_state(
                conn, write=write, channel=self.result_channel if notify else None
            )

    def write_unrun_states(self, writes: Sequence[StateWrite], *, notify: bool) -> int:
        """Record one state for many tasks that never ran, in one statement; rows written.

        For the tasks a failed chain never published (a later group's, say): no
        attempt and no transport row to fence on, so each gets (or keeps) its own row.
        A group of any size is one round trip and one commit.
        """
        if not writes:
            return 0
        statuses = {w.status for w in writes}
        if len(statuses) != 1 or any(w.transport_owned or w.attempt is not None for w in writes):
            raise ValueError("write_unrun_states takes one state of tasks that never ran")
        self.ensure_queues(sorted({w.queue_name for w in writes}))
        with self.single() as conn:
            return result_sql.upsert_unrun(
                conn,
                status=statuses.pop(),
                writes=writes,
                channel=self.result_channel if notify else None,
            )

    def read_results(
        self,
        job_ids: Sequence[UUID],
        *,
        ready_only: bool = False,
        with_payload: bool = False,
        with_failure_log: bool = False,
    ) -> list[StoredResult]:
        """The stored state of several tasks in one round trip; unknown ids are absent."""
        with self.single() as conn:
            return result_sql.read(
                conn,
                job_ids=job_ids,
                ready_only=ready_only,
                with_payload=with_payload,
                with_failure_log=with_failure_log,
            )

    def notify_results(self, payload: str) -> None:
        """Send one NOTIFY on the results channel (the listener's self-probe)."""
        with self.single() as conn:
            schema_sql.notify(conn, channel=self.result_channel, payload=payload)

    def result_listener(self) -> ResultListener:
        """The process's LISTEN connection for results (one, whatever the waiters)."""
        return ResultListener.shared(
            self.url,
            self.result_channel,
            connect_timeout=self.options.connect_timeout,
            probe=self.notify_results,
        )

    def save_group(self, group_id: UUID, result: Any) -> None:
        """Store a group's result tuple (a JSON value)."""
        with self.single() as conn:
            group_sql.save(conn, group_id=group_id, result=result)

    def group(self, group_id: UUID) -> str | None:
        """A saved group's result tuple as JSON text, or None."""
        with self.single() as conn:
            return group_sql.get(conn, group_id=group_id)

    def delete_group(self, group_id: UUID) -> int:
        """Remove a group with its chord counter and parts."""
        with self.single() as conn:
            return group_sql.delete(conn, group_id=group_id)

    def set_chord_size(self, group_id: UUID, size: int) -> None:
        """How many header parts the chord on ``group_id`` waits for."""
        with self.single() as conn:
            group_sql.set_chord_size(conn, group_id=group_id, size=size)

    def add_to_chord(self, group_id: UUID, count: int = 1) -> None:
        """Wait for ``count`` more header parts."""
        with self.single() as conn:
            group_sql.add_to_chord(conn, group_id=group_id, count=count)

    def count_chord_part(
        self, group_id: UUID, task_id: UUID, group_index: int | None, state: str
    ) -> bool:
        """Count one finished header part; True for the one caller that must start the body."""
        with self.single() as conn:
            return group_sql.count_part(
                conn, group_id=group_id, task_id=task_id, group_index=group_index, state=state
            )

    def chord_parts(self, group_id: UUID) -> list[ChordPart]:
        """The counted parts of a chord in header order, with their stored results."""
        with self.single() as conn:
            return group_sql.parts(conn, group_id=group_id)

    def forget_chord_parts(self, group_id: UUID) -> int:
        """Drop a started chord's parts; its group row stays as the "started" marker."""
        with self.single() as conn:
            return group_sql.forget_parts(conn, group_id=group_id)

    def prune_groups(self, *, older_than: float, max_batches: int = 10_000) -> int:
        """Delete groups untouched for ``older_than`` seconds, in short batches."""
        batch = self.options.prune_batch_size
        return self._drain(
            lambda c: group_sql.prune(c, older_than=older_than, limit=batch),
            batch,
            False,
            max_batches,
        )


os.register_at_fork(after_in_child=Store._after_fork_in_child)
