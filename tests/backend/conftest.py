"""Fixtures for result-backend tests: apps whose backend is pgqueue, in-thread workers.

The backend must work with any broker, so worker tests run twice: with the pgqueue
transport (the job row is the transport's, writes are fenced by attempt) and with
Kombu's in-memory broker (no row until the backend writes one). Redis, when the machine
has one, gets its own module (``test_redis_broker.py``).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import helpers
import psycopg
import pytest
from celery import Celery

from celery_pgqueue.ids import job_id_for
from celery_pgqueue.leases import LeaseKeeper
from celery_pgqueue.store import Store
from celery_pgqueue.store.notify import ResultListener

BROKERS = ("pgqueue", "memory", "redis")
REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_missing() -> str | None:
    """Why Redis can't be used here, or None when it answers at 127.0.0.1:6379."""
    try:
        import redis
    except ImportError:
        return "the redis package is not installed"
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping()
    except Exception as exc:
        return f"no Redis at {REDIS_URL} ({type(exc).__name__}: {exc})"
    return None


def pgqueue_url(database_url: str) -> str:
    """The ``pgqueue://`` URL for a test database's ``postgresql://`` URL."""
    return "pgqueue://" + database_url.split("://", 1)[1]


@dataclass
class Tasks:
    """The test tasks of one app, plus what they recorded in this process."""

    app: Celery
    database_url: str
    broker: str
    errbacks: list[tuple[str, str]] = field(default_factory=list)
    finished_at: dict[Any, float] = field(default_factory=dict)
    gate: threading.Event = field(default_factory=threading.Event)

    def __getattr__(self, name: str) -> Any:
        return self.app.tasks[f"t.{name}"]

    def job(self, task_id: str) -> dict[str, Any] | None:
        return job_row(self.database_url, task_id)

    def attempts(self, task_id: str) -> list[dict[str, Any]]:
        return log_rows(self.database_url, task_id)


def define_tasks(app: Celery, database_url: str, broker: str) -> Tasks:
    """Register the tasks every backend test uses on ``app``."""
    tasks = Tasks(app, database_url, broker)

    @app.task(name="t.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="t.echo", shared=False)
    def echo(value: Any) -> Any:
        return value

    @app.task(name="t.timed", shared=False)
    def timed(key: Any) -> Any:
        tasks.finished_at[key] = time.monotonic()
        return key

    @app.task(name="t.gated", shared=False)
    def gated(key: Any) -> Any:
        if not tasks.gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        tasks.finished_at[key] = time.monotonic()
        return key

    @app.task(name="t.tracked", shared=False, track_started=True)
    def tracked() -> str:
        if not tasks.gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return "tracked"

    @app.task(name="t.later", shared=False, bind=True, max_retries=1)
    def later(self: Any) -> int:
        if not self.request.retries:
            raise self.retry(exc=KeyError("not yet"), countdown=1.5)
        return int(self.request.retries)

    @app.task(name="t.fail", shared=False)
    def fail(message: str = "boom") -> None:
        raise ValueError(message)

    @app.task(name="t.flaky", shared=False, bind=True, max_retries=5)
    def flaky(self: Any, times: int) -> int:
        if self.request.retries < times:
            raise self.retry(exc=KeyError(f"try {self.request.retries}"), countdown=0)
        return int(self.request.retries)

    @app.task(name="t.unlimited", shared=False, bind=True, max_retries=None)
    def unlimited(self: Any) -> str:
        return "ok"

    @app.task(name="t.progress", shared=False, bind=True)
    def progress(self: Any, total: int) -> str:
        self.update_state(state="PROGRESS", meta={"done": 1, "total": total})
        if not tasks.gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return "finished"

    @app.task(name="t.big", shared=False)
    def big(size: int) -> str:
        return "x" * size

    @app.task(name="t.unencodable", shared=False)
    def unencodable() -> Any:
        return object()

    @app.task(name="t.nan", shared=False)
    def nan() -> float:
        return float("nan")

    @app.task(name="t.quiet", shared=False, ignore_result=True)
    def quiet(key: Any) -> Any:
        tasks.finished_at[key] = time.monotonic()
        return key

    @app.task(name="t.timed_fail", shared=False)
    def timed_fail(key: Any) -> None:
        tasks.finished_at[key] = time.monotonic()
        raise ValueError(f"timed {key}")

    @app.task(name="t.quiet_fail", shared=False, ignore_result=True)
    def quiet_fail(key: Any) -> None:
        tasks.finished_at[key] = time.monotonic()
        raise ValueError(f"quiet {key}")

    @app.task(
        name="t.quiet_fail_kept",
        shared=False,
        ignore_result=True,
        store_errors_even_if_ignored=True,
    )
    def quiet_fail_kept(key: Any) -> None:
        tasks.finished_at[key] = time.monotonic()
        raise ValueError(f"kept {key}")

    @app.task(name="t.on_error", shared=False)
    def on_error(request: Any, exc: BaseException, traceback: Any) -> None:
        tasks.errbacks.append((request.id, f"{type(exc).__name__}: {exc}"))

    return tasks


def make_app(
    database_url: str,
    broker: str = "pgqueue",
    *,
    backend_options: dict[str, Any] | None = None,
    **conf: Any,
) -> Tasks:
    """An app with the pgqueue backend on ``database_url`` and the given broker."""
    token = secrets.token_hex(4)
    app = Celery(f"backend-{token}", set_as_current=False)
    if broker == "pgqueue":
        broker_url, transport_options = pgqueue_url(database_url), {"polling_interval": 0.5}
    elif broker == "memory":
        broker_url, transport_options = "memory://", {"polling_interval": 0.01}
    elif broker == "redis":
        # A key prefix per app: other tests (and people) may use the same Redis.
        broker_url, transport_options = REDIS_URL, {"global_keyprefix": f"cpq-test-{token}:"}
    else:
        broker_url, transport_options = broker, conf.pop("broker_transport_options", {})
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options,
        result_backend=pgqueue_url(database_url),
        result_backend_transport_options=backend_options or {},
        # A queue per app: the memory broker is shared by the whole process.
        task_default_queue=f"q-{token}",
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    app.conf.update(conf)
    return define_tasks(app, database_url, broker)


@contextlib.contextmanager
def running_worker(app: Celery, **kwargs: Any) -> Iterator[Any]:
    """A real Celery worker in a thread (threads pool unless told otherwise)."""
    kwargs.setdefault("pool", "threads")
    kwargs.setdefault("concurrency", 4)
    with helpers.running_worker(app, **kwargs) as worker:
        yield worker


def release_database_clients() -> None:
    """Let go of pools and LISTEN connections before a test database is dropped."""
    ResultListener.stop_all()
    LeaseKeeper.stop_all()
    Store.close_all()


@pytest.fixture(scope="module", params=BROKERS)
def worker_tasks(request: pytest.FixtureRequest, module_database_url: str) -> Iterator[Tasks]:
    """One worker per module and broker, shared by that module's tests."""
    if request.param == "redis" and (reason := redis_missing()):
        pytest.skip(f"redis broker + pgqueue backend not tested: {reason}")
    tasks = make_app(module_database_url, request.param)
    try:
        with running_worker(tasks.app, concurrency=8):
            yield tasks
    finally:
        tasks.app.close()
        release_database_clients()
        if request.param == "redis":
            forget_redis_keys(tasks.app.conf.broker_transport_options["global_keyprefix"])


def forget_redis_keys(prefix: str) -> None:
    """Delete what one test app left in Redis (its keys share a unique prefix)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def backend_tasks(database_url: str) -> Iterator[Callable[..., Tasks]]:
    """Apps on a private database, for tests that need their own configuration."""
    made: list[Tasks] = []

    def factory(broker: str = "pgqueue", **kwargs: Any) -> Tasks:
        tasks = make_app(database_url, broker, **kwargs)
        made.append(tasks)
        return tasks

    yield factory
    for tasks in made:
        with contextlib.suppress(Exception):
            tasks.app.close()
    release_database_clients()


def rows(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


def job_row(database_url: str, task_id: str) -> dict[str, Any] | None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cur = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id_for(task_id),))
        names = [c.name for c in cur.description or []]
        row = cur.fetchone()
        return dict(zip(names, row, strict=True)) if row else None


def log_rows(database_url: str, task_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cur = conn.execute(
            "SELECT attempt_number, status, log_message, started_at, finished_at, duration"
            " FROM job_logs WHERE job_id = %s ORDER BY attempt_number, started_at",
            (job_id_for(task_id),),
        )
        names = [c.name for c in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
