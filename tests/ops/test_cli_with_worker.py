"""The CLI steering a real worker: pause stops claims, resume wakes, retry re-runs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from helpers import running_worker, wait_until

from celery_pgqueue.ids import job_id_for
from celery_pgqueue.store import Store

from .conftest import Result, pgqueue_url

pytestmark = pytest.mark.worker


@pytest.fixture
def worker_app(database_url: str) -> Any:
    app = Celery("ops-worker", set_as_current=False)
    app.conf.update(
        broker_url=pgqueue_url(database_url),
        broker_transport_options={"polling_interval": 30, "maintenance_interval": 5},
        worker_hijack_root_logger=False,
    )
    yield app
    app.close()
    Store.close_all()


@pytest.mark.slow
def test_pause_stops_a_running_worker_and_resume_wakes_it(
    worker_app: Celery, celery_cli: Callable[..., Result], sql: Callable[..., Any]
) -> None:
    ran: list[int] = []

    @worker_app.task(name="ops.tick", shared=False)
    def tick(n: int) -> None:
        ran.append(n)

    with running_worker(worker_app):
        tick.delay(1)
        wait_until(lambda: ran == [1], timeout=15)
        paused = celery_cli("pause", "celery")
        assert paused.code == 0, paused
        tick.delay(2)
        with pytest.raises(AssertionError):
            wait_until(lambda: len(ran) > 1, timeout=2)
        assert sql("SELECT count(*) FROM jobs WHERE status = 'queued'") == [(1,)]
        resumed = celery_cli("resume", "celery")
        assert resumed.code == 0, resumed
        # polling_interval is 30 s: only the resume's NOTIFY wakes the worker this soon.
        wait_until(lambda: ran == [1, 2], timeout=10)


@pytest.mark.slow
def test_retry_re_runs_a_failed_task_and_keeps_its_history(
    worker_app: Celery, celery_cli: Callable[..., Result], sql: Callable[..., Any]
) -> None:
    attempts: list[int] = []
    healed = threading.Event()

    @worker_app.task(name="ops.flaky", shared=False)
    def flaky() -> str:
        attempts.append(1)
        if not healed.is_set():
            raise RuntimeError("provider down")
        return "ok"

    with running_worker(worker_app):
        result = flaky.delay()
        job = str(job_id_for(result.id))
        wait_until(
            lambda: sql("SELECT status FROM jobs WHERE id = %s", job) == [("failed",)], timeout=15
        )
        healed.set()
        retried = celery_cli("retry", job)
        assert retried.code == 0, retried
        wait_until(
            lambda: sql("SELECT status FROM jobs WHERE id = %s", job) == [("completed",)],
            timeout=15,
        )
    assert len(attempts) == 2
    logs = sql("SELECT attempt_number, status FROM job_logs WHERE job_id = %s ORDER BY 1", job)
    assert logs == [(1, "failed"), (2, "success")]


@pytest.mark.slow
def test_retry_of_a_revoked_task_is_refused_because_the_worker_remembers_the_revoke(
    worker_app: Celery, celery_cli: Callable[..., Result], sql: Callable[..., Any]
) -> None:
    """Requeued, it would be claimed and cancelled again at once: say so instead."""
    from celery.worker.state import revoked

    ran: list[int] = []

    @worker_app.task(name="ops.later", shared=False)
    def later() -> None:
        ran.append(1)

    with running_worker(worker_app):
        result = later.apply_async(countdown=3600)
        job = str(job_id_for(result.id))
        worker_app.control.revoke(result.id)
        wait_until(lambda: result.id in revoked, timeout=15, message="the worker got the revoke")
        assert sql("SELECT status FROM jobs WHERE id = %s", job) == [("cancelled",)]
        retried = celery_cli("retry", job)
        assert retried.code == 1, retried
        assert "requeued" not in retried.out
        assert "it was cancelled by revoke()" in retried.err
        assert sql("SELECT status FROM jobs WHERE id = %s", job) == [("cancelled",)]
    assert ran == []
