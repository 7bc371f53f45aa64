"""The configurations compared, and the services (databases, Redis DB, RabbitMQ) behind them.

Every configuration runs the same app module (``harness.app``) with a different
``broker_url`` / ``result_backend``. Services are set up once per run, emptied before
every measurement, and left as found at the end: the PostgreSQL databases we created
are dropped, only our Redis DB number is flushed (and only if it was empty when we
started), and the RabbitMQ queue and exchanges we declared are deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql


def _tcp_reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def with_database(url: str, database: str, scheme: str | None = None) -> str:
    """``url`` pointed at another database (and, optionally, another scheme)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=scheme or parts.scheme, path=f"/{database}"))


class Service:
    """Something a configuration needs: reachable or not, set up once, emptied, undone."""

    name = "service"

    def __init__(self) -> None:
        self.ready = False
        self.error: str | None = None

    def unavailable(self) -> str | None:
        """Why this service cannot be used, or None."""
        raise NotImplementedError

    def ensure(self) -> None:
        if not self.ready:
            self.setup()
            self.ready = True

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass


class PostgresDatabase(Service):
    """A database of our own on the admin server, created fresh and dropped at the end."""

    def __init__(self, admin_url: str, kind: str, migrate: bool) -> None:
        super().__init__()
        self.admin_url = admin_url
        self.database = f"cpq_bench_{kind}_{secrets.token_hex(4)}"
        self.migrate = migrate
        self.name = f"postgresql ({kind})"
        self.created = False

    @property
    def url(self) -> str:
        """libpq URL of our database."""
        return with_database(self.admin_url, self.database, scheme="postgresql")

    def unavailable(self) -> str | None:
        try:
            with psycopg.connect(self.admin_url, connect_timeout=2):
                return None
        except psycopg.Error as exc:
            return f"PostgreSQL at {_host_port(self.admin_url)} unreachable: {_first(exc)}"

    def setup(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        self.created = True
        if self.migrate:
            # In a child process: the harness itself never imports celery_pgqueue, so
            # every process uses the same (snapshotted) source via PYTHONPATH.
            python_code(
                "import sys; from celery_pgqueue.migrate import upgrade; upgrade(sys.argv[1])",
                self.url,
            )

    def execute(self, *statements: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]

    def value(self, query: str, *params: Any) -> Any:
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        return row[0] if row else None

    def existing_tables(self, names: list[str]) -> list[str]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename = ANY(%s)",
                (names,),
            ).fetchall()
        return [r[0] for r in rows]

    def teardown(self) -> None:
        if not self.created:
            return
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.database)
                )
            )
        self.created = False


class RedisDatabase(Service):
    """One Redis DB number; used only if empty at start, flushed after every use."""

    def __init__(self, host: str, port: int, db: int) -> None:
        super().__init__()
        self.host, self.port, self.db = host, port, db
        self.name = f"redis db {db}"
        self.used = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"

    def client(self) -> Any:
        import redis

        return redis.Redis(host=self.host, port=self.port, db=self.db, socket_timeout=5)

    def unavailable(self) -> str | None:
        try:
            client = self.client()
            client.ping()
        except ImportError:
            return "the redis client is not installed (pip install redis)"
        except Exception as exc:
            return f"Redis at {self.host}:{self.port} unreachable: {_first(exc)}"
        if not self.used and client.dbsize():
            return (
                f"Redis DB {self.db} is not empty (someone else's data); "
                "pick an empty one with --redis-db"
            )
        return None

    def setup(self) -> None:
        self.used = True

    def flush(self) -> None:
        self.client().flushdb()

    def teardown(self) -> None:
        if self.used:
            self.flush()


class RabbitVhost(Service):
    """RabbitMQ's default vhost; we delete the queue and exchanges our app declared."""

    def __init__(self, url: str, queue: str, control_exchange: str) -> None:
        super().__init__()
        self.url = url
        self.queue = queue
        self.exchanges = [queue, f"{control_exchange}.pidbox", f"reply.{control_exchange}.pidbox"]
        self.name = "rabbitmq"
        self.used = False
        self.reply_queues: set[str] = set()

    def unavailable(self) -> str | None:
        parts = urlsplit(self.url)
        if not _tcp_reachable(parts.hostname or "127.0.0.1", parts.port or 5672):
            return f"RabbitMQ at {parts.hostname}:{parts.port or 5672} unreachable"
        try:
            importlib.import_module("amqp")
        except ImportError:
            return "the amqp client is not installed"
        return None

    def setup(self) -> None:
        self.used = True

    def connection(self) -> Any:
        from kombu import Connection

        return Connection(self.url, connect_timeout=5)

    def purge(self) -> None:
        with self.connection() as conn:
            channel = conn.channel()
            with contextlib.suppress(Exception):
                channel.queue_purge(self.queue)

    def depth(self) -> int:
        with self.connection() as conn:
            channel = conn.channel()
            try:
                return int(channel.queue_declare(self.queue, passive=True).message_count)
            except Exception:
                return 0

    def delete_queues(self, names: list[str]) -> None:
        """Delete the rpc:// reply queues a producer declared (they outlive it for
        ``result_expires`` when nobody consumed them)."""
        self.reply_queues.update(names)
        if not names:
            return
        with self.connection() as conn:
            for name in names:
                channel = conn.channel()
                with contextlib.suppress(Exception):
                    channel.queue_delete(name)

    def teardown(self) -> None:
        if not self.used:
            return
        self.delete_queues(sorted(self.reply_queues))
        with self.connection() as conn:
            channel = conn.channel()
            with contextlib.suppress(Exception):
                channel.queue_delete(self.queue)
            for exchange in self.exchanges:
                channel = conn.channel()  # a failed delete closes the channel
                with contextlib.suppress(Exception):
                    channel.exchange_delete(exchange)


def python_code(code: str, *args: str, timeout: float = 120.0) -> str:
    """Run ``python -c code`` with the benchmark environment; its stdout, or RuntimeError."""
    import subprocess
    import sys

    from harness import workers

    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=workers.ROOT,
        env=workers.environment(Path(os.devnull)),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit {done.returncode}")
    return done.stdout


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}"


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class Configuration:
    """One broker + result backend pair, with how to empty it and count what waits."""

    name: str
    label: str
    results: bool
    services: list[Service]
    conf: Callable[[], dict[str, Any]]
    reset: Callable[[], None]
    depth: Callable[[], int]
    """Messages waiting in the broker and due now (not yet handed to a worker)."""
    waiting: Callable[[], int] | None = None
    """Messages not handed to a worker, due or not (default: ``depth``)."""
    extra_unavailable: Callable[[], str | None] = field(default=lambda: None)
    after_producer: Callable[[dict[str, Any]], None] = field(default=lambda produced: None)
    """Clean up what a producer left in the broker (rpc reply queues)."""

    def unavailable(self) -> str | None:
        for service in self.services:
            reason = service.unavailable()
            if reason:
                return reason
        return self.extra_unavailable()

    def ensure(self) -> None:
        for service in self.services:
            service.ensure()


@dataclass
class Services:
    """Every service and configuration of one harness run."""

    admin_url: str
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = 11
    amqp_url: str = "pyamqp://guest:guest@127.0.0.1:5672//"
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))

    def __post_init__(self) -> None:
        self.queue = f"bench_{self.run_id}"
        self.pgqueue_db = PostgresDatabase(self.admin_url, "pgqueue", migrate=True)
        self.sqla_db = PostgresDatabase(self.admin_url, "sqla", migrate=False)
        self.redis = RedisDatabase(self.redis_host, self.redis_port, self.redis_db)
        self.rabbit = RabbitVhost(self.amqp_url, self.queue, self.queue)
        self.all_services: list[Service] = [
            self.pgqueue_db,
            self.sqla_db,
            self.redis,
            self.rabbit,
        ]
        self.configurations = {c.name: c for c in self._configurations()}
        self._backlog: dict[tuple[str, int], PostgresDatabase] = {}

    def checkpoint(self) -> bool:
        """Write PostgreSQL's dirty pages out now (best effort; False if not allowed).

        Run before every measurement, whatever its broker: the harness's own bulk writes
        (the backlog levels' million-row fills, the previous measurement) must not be
        flushed, and their fsyncs waited on, inside the next one's timing.
        """
        try:
            with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=2) as conn:
                conn.execute("CHECKPOINT")
        except psycopg.Error:
            return False
        return True

    def common(self) -> dict[str, Any]:
        return {
            "task_default_queue": self.queue,
            "control_exchange": self.queue,
            "broker_connection_retry_on_startup": True,
            "worker_hijack_root_logger": True,
            "worker_redirect_stdouts": False,
            "result_expires": 3600,
        }

    def _configurations(self) -> list[Configuration]:
        pg = self.pgqueue_db
        sqla = self.sqla_db

        def pgqueue_url() -> str:
            return with_database(self.admin_url, pg.database, scheme="pgqueue")

        def pgqueue_reset() -> None:
            pg.execute("TRUNCATE jobs, job_logs, job_queues, job_groups, job_chord_parts CASCADE")

        def pgqueue_waiting() -> int:
            return int(
                pg.value(
                    "SELECT count(*) FROM jobs WHERE status = 'queued' AND queue_name = %s",
                    self.queue,
                )
            )

        def pgqueue_depth() -> int:
            return int(
                pg.value(
                    "SELECT count(*) FROM jobs WHERE status = 'queued' AND run_at <= now()"
                    " AND queue_name = %s",
                    self.queue,
                )
            )

        def backend_missing() -> str | None:
            try:
                python_code("import celery_pgqueue.backend")
            except RuntimeError as exc:
                return f"the pgqueue result backend does not import ({_first(exc)})"
            return None

        def sqla_url(scheme: str) -> str:
            return with_database(self.admin_url, sqla.database, scheme=scheme)

        def sqla_reset() -> None:
            tables = sqla.existing_tables(
                ["kombu_message", "celery_taskmeta", "celery_tasksetmeta"]
            )
            if tables:
                sqla.execute(f"TRUNCATE {', '.join(tables)}")

        def sqla_depth() -> int:
            if not sqla.existing_tables(["kombu_message"]):
                return 0
            return int(
                sqla.value(
                    "SELECT count(*) FROM kombu_message m JOIN kombu_queue q"
                    " ON q.id = m.queue_id WHERE m.visible AND q.name = %s",
                    self.queue,
                )
            )

        def redis_depth() -> int:
            client = self.redis.client()
            total = 0
            for key in client.scan_iter(f"{self.queue}*"):
                if client.type(key) == b"list":
                    total += int(client.llen(key))
            return total

        pgqueue = Configuration(
            name="pgqueue",
            label="pgqueue broker + pgqueue backend",
            results=True,
            services=[pg],
            conf=lambda: {"broker_url": pgqueue_url(), "result_backend": pgqueue_url()},
            reset=pgqueue_reset,
            depth=pgqueue_depth,
            waiting=pgqueue_waiting,
            extra_unavailable=backend_missing,
        )
        no_fsync = {"synchronous_commit": False}
        return [
            pgqueue,
            Configuration(
                name="pgqueue-noresult",
                label="pgqueue broker, ignore_result",
                results=False,
                services=[pg],
                conf=lambda: {
                    "broker_url": pgqueue_url(),
                    "result_backend": None,
                    "task_ignore_result": True,
                },
                reset=pgqueue_reset,
                depth=pgqueue_depth,
                waiting=pgqueue_waiting,
            ),
            # Redis here runs without fsync (appendonly no): this row shows pgqueue with
            # the same durability, commits acknowledged before the WAL flush.
            dataclasses.replace(
                pgqueue,
                name="pgqueue-async",
                label="pgqueue broker + backend, synchronous_commit off",
                conf=lambda: {
                    **pgqueue.conf(),
                    "broker_transport_options": no_fsync,
                    "result_backend_transport_options": no_fsync,
                },
            ),
            Configuration(
                name="redis",
                label="Redis broker + Redis backend",
                results=True,
                services=[self.redis],
                conf=lambda: {"broker_url": self.redis.url, "result_backend": self.redis.url},
                reset=self.redis.flush,
                depth=redis_depth,
            ),
            Configuration(
                name="redis-noresult",
                label="Redis broker, ignore_result",
                results=False,
                services=[self.redis],
                conf=lambda: {
                    "broker_url": self.redis.url,
                    "result_backend": None,
                    "task_ignore_result": True,
                },
                reset=self.redis.flush,
                depth=redis_depth,
            ),
            Configuration(
                name="amqp-rpc",
                label="RabbitMQ (pyamqp) + rpc:// backend",
                results=True,
                services=[self.rabbit],
                conf=lambda: {"broker_url": self.amqp_url, "result_backend": "rpc://"},
                reset=self.rabbit.purge,
                depth=self.rabbit.depth,
                after_producer=lambda produced: self.rabbit.delete_queues(
                    list(produced.get("reply_queues") or [])
                ),
            ),
            Configuration(
                name="sqla-db",
                label="Kombu sqla+postgresql broker + Celery db+ backend",
                results=True,
                services=[sqla],
                conf=lambda: {
                    "broker_url": sqla_url("sqla+postgresql+psycopg"),
                    "result_backend": sqla_url("db+postgresql+psycopg"),
                },
                reset=sqla_reset,
                depth=sqla_depth,
            ),
        ]

    def backlog_database(self, target: str, rows: int) -> PostgresDatabase:
        """The database of one backlog level (created on first use, dropped at the end)."""
        key = (target, rows)
        if key not in self._backlog:
            database = PostgresDatabase(
                self.admin_url, f"backlog_{target}_{rows}", migrate=target == "pgqueue"
            )
            self._backlog[key] = database
            self.all_services.append(database)
        return self._backlog[key]

    def teardown(self) -> list[str]:
        """Undo every service we touched; returns errors (never raises)."""
        errors = []
        for service in self.all_services:
            try:
                service.teardown()
            except Exception as exc:
                errors.append(f"{service.name}: {_first(exc)}")
        return errors
