"""Retention: celery.backend_cleanup deletes expired jobs, logs and groups in batches."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from celery import states

from .conftest import Tasks, rows


def age_rows(database_url: str, count: int, status: str, age: str) -> None:
    """``count`` jobs of ``status`` last touched ``age`` ago, each with one log row."""
    rows(
        database_url,
        "WITH made AS ("
        " INSERT INTO jobs (id, queue_name, status, priority, result, completed_at, failed_at,"
        "  created_at, updated_at)"
        " SELECT gen_random_uuid(), 'celery', %s, 100, '{\"status\": \"SUCCESS\"}',"
        "  now() - %s::interval, now() - %s::interval, now() - %s::interval,"
        "  now() - %s::interval"
        " FROM generate_series(1, %s) RETURNING id)"
        " INSERT INTO job_logs (job_id, attempt_number, status, started_at, finished_at)"
        " SELECT id, 1, 'success', now() - %s::interval, now() - %s::interval FROM made"
        " RETURNING 1",
        status,
        age,
        age,
        age,
        age,
        count,
        age,
        age,
    )


@pytest.mark.slow
def test_cleanup_deletes_100000_expired_jobs_in_short_batches(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks(result_expires=timedelta(hours=1))
    rows(tasks.database_url, "INSERT INTO job_queues (name) VALUES ('celery') RETURNING 1")
    age_rows(tasks.database_url, 100_000, "completed", "2 hours")
    age_rows(tasks.database_url, 10, "completed", "10 minutes")
    age_rows(tasks.database_url, 10, "failed", "2 hours")  # failed_retention is 7 days
    store = tasks.app.backend.store
    commits: list[int] = []
    sa.event.listen(store.engine, "commit", lambda *_: commits.append(1))

    tasks.app.tasks["celery.backend_cleanup"].apply()

    assert rows(tasks.database_url, "SELECT status, count(*) FROM jobs GROUP BY 1 ORDER BY 1") == [
        ("completed", 10),
        ("failed", 10),
    ], "expired per result_expires; younger and failed jobs stay"
    assert rows(tasks.database_url, "SELECT count(*) FROM job_logs") == [(20,)]
    batch = store.options.prune_batch_size
    assert len(commits) >= 100_000 // batch, "one short transaction per batch"


def test_completed_retention_overrides_result_expires_and_groups_expire_too(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks(
        result_expires=timedelta(days=30), backend_options={"completed_retention": 60.0}
    )
    rows(tasks.database_url, "INSERT INTO job_queues (name) VALUES ('celery') RETURNING 1")
    age_rows(tasks.database_url, 5, "completed", "5 minutes")
    age_rows(tasks.database_url, 5, "cancelled", "5 minutes")
    group_id = uuid.uuid4()
    tasks.app.backend.store.save_group(group_id, [str(group_id), []])
    rows(
        tasks.database_url,
        "UPDATE job_groups SET updated_at = now() - interval '5 minutes' RETURNING 1",
    )

    tasks.app.backend.cleanup()

    assert rows(tasks.database_url, "SELECT count(*) FROM jobs") == [(0,)]
    assert rows(tasks.database_url, "SELECT count(*) FROM job_groups") == [(0,)]


def test_forget_removes_only_that_job(backend_tasks: Callable[..., Tasks]) -> None:
    tasks = backend_tasks()
    kept, forgotten = str(uuid.uuid4()), str(uuid.uuid4())
    for task_id in (kept, forgotten):
        tasks.app.backend.store_result(task_id, 1, states.SUCCESS)

    tasks.app.AsyncResult(forgotten).forget()

    remaining: list[Any] = [str(r[0]) for r in rows(tasks.database_url, "SELECT id FROM jobs")]
    assert remaining == [kept]
