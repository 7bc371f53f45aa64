"""Fixtures for operations tests: the CLI run as a real command, rows in known states.

Every CLI test runs the installed console scripts in a subprocess (``celery -A app
pgqueue …`` through Celery's entry point, and ``celery-pgqueue``), against the
test's own database, so argument parsing, app loading and exit codes are the ones
users get.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import NewJob, Store

BIN = Path(sys.executable).parent


def pgqueue_url(database_url: str) -> str:
    """The broker URL for a test database URL."""
    return "pgqueue://" + database_url.split("://", 1)[1]


@dataclass
class Result:
    """A finished command: exit code and both streams."""

    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def _run(argv: Sequence[str], cwd: Path, stdin: str | None, env: dict[str, str]) -> Result:
    full_env = {**os.environ, **env}
    full_env.pop("CELERY_PGQUEUE_URL", None)
    full_env.update(env)
    done = subprocess.run(
        list(argv),
        cwd=cwd,
        input=stdin or "",
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def write_app(tmp_path: Path) -> Callable[..., str]:
    """Write a tiny Celery app module to tmp_path; returns its name for ``-A``."""
    count = iter(range(1000))

    def write(**conf: Any) -> str:
        name = f"opsapp{next(count)}"
        settings = ",\n".join(f"    {k}={v!r}" for k, v in conf.items())
        (tmp_path / f"{name}.py").write_text(
            textwrap.dedent(
                """\
                from celery import Celery

                app = Celery("ops")
                app.conf.update(
                {settings}
                )
                """
            ).format(settings=settings)
        )
        return name

    return write


@pytest.fixture
def app_module(write_app: Callable[..., str], database_url: str) -> str:
    """An app whose broker is the test database, as ``pgqueue://``."""
    return write_app(broker_url=pgqueue_url(database_url))


@pytest.fixture
def celery_cli(tmp_path: Path, app_module: str) -> Callable[..., Result]:
    """``celery -A <app> pgqueue ARGS`` in a subprocess; ``app=`` picks another module."""

    def run(*args: str, app: str | None = None, stdin: str | None = None) -> Result:
        env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
        argv = [str(BIN / "celery"), "-A", app or app_module, "pgqueue", *args]
        return _run(argv, tmp_path, stdin, env)

    return run


@pytest.fixture
def standalone_cli(tmp_path: Path) -> Callable[..., Result]:
    """``celery-pgqueue ARGS`` in a subprocess (no Celery app at all)."""

    def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
        return _run([str(BIN / "celery-pgqueue"), *args], tmp_path, stdin, env or {})

    return run


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A store on the test database (its own pool, closed before the database drops)."""
    store = Store(database_url, PgQueueOptions())
    try:
        yield store
    finally:
        store.dispose()


@pytest.fixture
def sql(database_url: str) -> Iterator[Callable[..., list[tuple[Any, ...]]]]:
    """Run one SQL statement in autocommit and return its rows (for aging and checks)."""
    conn = psycopg.connect(database_url, autocommit=True)

    def run(statement: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = conn.execute(statement, params)  # type: ignore[call-overload]
        return cur.fetchall() if cur.description else []

    try:
        yield run
    finally:
        conn.close()


class Jobs:
    """Jobs put in a known state through the store, the way a worker would."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def queued(
        self,
        queue: str = "default",
        task: str = "proj.tasks.add",
        job_id: uuid.UUID | None = None,
        **kw: Any,
    ) -> uuid.UUID:
        job_id = job_id or uuid.uuid4()
        payload = {"headers": {"task": task, "id": str(job_id)}, "body": [[1, 2], {}, {}]}
        self.store.enqueue([NewJob(id=job_id, queue_name=queue, payload=payload, **kw)])
        return job_id

    def running(self, queue: str = "default", task: str = "proj.tasks.add") -> uuid.UUID:
        # Priority 0 runs before the default 100, so the claim takes this job and
        # leaves any queued ones alone.
        job_id = self.queued(queue, task, priority=0)
        assert self._claim(queue, job_id) == 1
        return job_id

    def completed(self, queue: str = "default", task: str = "proj.tasks.add") -> uuid.UUID:
        job_id = self.running(queue, task)
        assert self.store.finish(
            job_id, attempt=1, status=JobStatus.COMPLETED, log_status=LogStatus.SUCCESS
        )
        return job_id

    def failed(
        self, queue: str = "default", task: str = "proj.tasks.add", attempts: int = 1
    ) -> uuid.UUID:
        """A job that failed after ``attempts`` tries (the earlier ones retried)."""
        job_id = self.queued(queue, task, priority=0)
        for attempt in range(1, attempts + 1):
            assert self._claim(queue, job_id) == attempt
            last = attempt == attempts
            if not last:
                # As Task.retry() does: re-publish the same id (the row is queued
                # again), then store RETRY for the attempt that ran.
                self.queued(queue, task, job_id=job_id, priority=0)
            assert self.store.finish(
                job_id,
                attempt=attempt,
                status=JobStatus.FAILED if last else JobStatus.QUEUED,
                log_status=LogStatus.FAILED if last else LogStatus.RETRY,
                error_message="ValueError: boom" if last else None,
                log_message=f"attempt {attempt}",
            )
        return job_id

    def cancelled(self, queue: str = "default") -> uuid.UUID:
        job_id = self.queued(queue)
        assert self.store.cancel([job_id]) == 1
        return job_id

    def _claim(self, queue: str, job_id: uuid.UUID) -> int:
        claimed = self.store.claim(queue, 1, owner="test-worker")
        assert [c.id for c in claimed] == [job_id], "another job was claimed first"
        return claimed[0].attempt


@pytest.fixture
def jobs(store: Store) -> Jobs:
    return Jobs(store)
