"""Celery's ``expires``: a task still queued when it expires ends REVOKED, as on Redis.

pgqueue broker and backend. The row ends ``cancelled`` with a log row saying why,
whoever notices first: a client waiting in ``get()``, a worker's maintenance, or the
worker that finds the task expired when it comes to run it. Until then a read of the
state already says REVOKED: expiry is decided by the database's clock alone.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from celery.exceptions import TaskRevokedError
from helpers import wait_until

from .conftest import Tasks, running_worker

pytestmark = pytest.mark.worker

EXPIRES = {
    "seconds": lambda: 1,
    "datetime": lambda: dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1),
}


def assert_revoked_as_expired(tasks: Tasks, result: Any) -> None:
    assert result.status == "REVOKED"
    assert result.ready() and not result.failed() and not result.successful()
    row = tasks.job(result.id)
    assert row is not None and row["status"] == "cancelled"
    logs = tasks.attempts(result.id)
    assert logs and logs[-1]["status"] == "failed", logs
    assert "expired" in (logs[-1]["log_message"] or ""), logs


@pytest.mark.parametrize("expires", list(EXPIRES.values()), ids=list(EXPIRES))
def test_get_raises_revoked_for_a_task_that_expired_in_the_queue(
    backend_tasks: Callable[..., Tasks], expires: Callable[[], Any]
) -> None:
    """Nobody consumes the queue: the waiting client itself records the expiry."""
    tasks = backend_tasks(result_backend_transport_options={"polling_interval": 60})
    result = tasks.add.apply_async((1, 2), expires=expires())
    with pytest.raises(TaskRevokedError, match="expired"):
        result.get(timeout=15)
    assert_revoked_as_expired(tasks, result)


def test_an_expired_task_reads_revoked_before_anyone_recorded_it(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks()
    result = tasks.add.apply_async((1, 2), expires=1)
    assert result.status == "PENDING"
    wait_until(lambda: tasks.app.AsyncResult(result.id).status == "REVOKED", timeout=15)
    assert tasks.app.AsyncResult(result.id).ready()


def test_a_task_that_expires_behind_a_busy_worker_ends_revoked(
    backend_tasks: Callable[..., Tasks],
) -> None:
    """The worker holds one task at a time and is busy past the expiry: never run.

    (``acks_late``: with an early ack the pool would take the next task right away and
    run it later, as Celery does on any broker.)
    """
    tasks = backend_tasks(
        broker_transport_options={"polling_interval": 0.5, "maintenance_interval": 1.0},
        worker_prefetch_multiplier=1,
        task_acks_late=True,
    )
    blocker = tasks.gated.delay("blocker")
    doomed = tasks.timed.apply_async(("doomed",), expires=1)
    with running_worker(tasks.app, concurrency=1):
        wait_until(lambda: tasks.app.AsyncResult(doomed.id).status == "REVOKED", timeout=20)
        tasks.gate.set()
        assert blocker.get(timeout=20) == "blocker"
        with pytest.raises(TaskRevokedError):
            doomed.get(timeout=20)
    assert_revoked_as_expired(tasks, doomed)
    assert "doomed" not in tasks.finished_at
