"""prune and maintain through the real command line: exactly the expired rows go."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from celery_pgqueue.store import Store

from .conftest import Jobs, Result, pgqueue_url

pytestmark = pytest.mark.slow


def age(sql: Callable[..., Any], job_id: uuid.UUID, interval: str) -> None:
    """Pretend ``job_id`` last changed ``interval`` ago (its logs too)."""
    sql("UPDATE jobs SET updated_at = now() - %s::interval WHERE id = %s", interval, job_id)
    sql(
        "UPDATE job_logs SET started_at = now() - %s::interval, "
        "finished_at = CASE WHEN finished_at IS NOT NULL THEN now() - %s::interval END "
        "WHERE job_id = %s",
        interval,
        interval,
        job_id,
    )


@pytest.fixture
def aged(jobs: Jobs, sql: Any) -> dict[str, uuid.UUID]:
    """One job per case, aged around the default retentions (1 day, failed 7 days)."""
    rows = {
        "old_completed": jobs.completed(),
        "new_completed": jobs.completed(),
        "old_cancelled": jobs.cancelled(),
        "old_failed": jobs.failed(),
        "young_failed": jobs.failed(),
        "old_queued": jobs.queued(),
        "old_running": jobs.running(),
    }
    age(sql, rows["old_completed"], "25 hours")
    age(sql, rows["old_cancelled"], "25 hours")
    age(sql, rows["old_failed"], "8 days")
    age(sql, rows["young_failed"], "2 days")
    age(sql, rows["old_queued"], "30 days")
    age(sql, rows["old_running"], "30 days")
    return rows


def test_prune_dry_run_counts_exactly_and_deletes_nothing(
    celery_cli: Callable[..., Result], aged: dict[str, uuid.UUID], store: Store
) -> None:
    result = celery_cli("prune", "--dry-run", "--json")
    assert result.code == 0, result
    document = json.loads(result.out)
    assert document["dry_run"] is True
    assert document["pruned"] == {"completed": 1, "cancelled": 1, "failed": 1, "logs": 0}
    assert document["retention_seconds"]["completed"] == 86_400
    assert all(store.job(j) for j in aged.values())


def test_prune_removes_exactly_the_expired_rows(
    celery_cli: Callable[..., Result], aged: dict[str, uuid.UUID], store: Store, sql: Any
) -> None:
    logs_before = sql("SELECT count(*) FROM job_logs")[0][0]
    result = celery_cli("prune")
    assert result.code == 0, result
    assert result.out.splitlines()[0] == (
        "pruned: 1 completed, 1 cancelled, 1 failed job(s), 0 log row(s)"
    )
    gone = {"old_completed", "old_cancelled", "old_failed"}
    for name, job_id in aged.items():
        assert (store.job(job_id) is None) == (name in gone), name
    # The pruned jobs' attempts went with them (completed 1 + failed 1; cancelled had none).
    assert sql("SELECT count(*) FROM job_logs")[0][0] == logs_before - 2


def test_prune_follows_result_expires_of_the_app(
    celery_cli: Callable[..., Result],
    write_app: Callable[..., str],
    database_url: str,
    jobs: Jobs,
    sql: Any,
    store: Store,
) -> None:
    app = write_app(broker_url=pgqueue_url(database_url), result_expires=3600)
    two_hours = jobs.completed()
    half_hour = jobs.completed()
    age(sql, two_hours, "2 hours")
    age(sql, half_hour, "30 minutes")
    result = celery_cli("prune", app=app)
    assert result.code == 0, result
    assert store.job(two_hours) is None
    assert store.job(half_hour) is not None


def test_prune_prefers_the_completed_retention_option(
    celery_cli: Callable[..., Result],
    write_app: Callable[..., str],
    database_url: str,
    jobs: Jobs,
    sql: Any,
    store: Store,
) -> None:
    app = write_app(
        broker_url=pgqueue_url(database_url),
        result_expires=3600,
        broker_transport_options={"completed_retention": 60},
    )
    job = jobs.completed()
    age(sql, job, "5 minutes")
    assert celery_cli("prune", app=app).code == 0
    assert store.job(job) is None


def test_prune_caps_logs_per_job_keeping_the_newest(
    celery_cli: Callable[..., Result],
    write_app: Callable[..., str],
    database_url: str,
    jobs: Jobs,
    store: Store,
) -> None:
    app = write_app(
        broker_url=pgqueue_url(database_url), broker_transport_options={"max_logs_per_job": 3}
    )
    many = jobs.failed(attempts=5)
    few = jobs.failed(attempts=2)
    dry = json.loads(celery_cli("prune", "--dry-run", "--json", app=app).out)
    assert dry["pruned"]["logs"] == 2
    assert celery_cli("prune", app=app).code == 0
    assert [a.attempt_number for a in store.attempts(many)] == [3, 4, 5]
    assert [a.attempt_number for a in store.attempts(few)] == [1, 2]


def test_maintain_runs_one_full_pass(
    celery_cli: Callable[..., Result], jobs: Jobs, sql: Any, store: Store
) -> None:
    lost = jobs.running()
    sql("UPDATE jobs SET lease_expires_at = now() - interval '1 minute' WHERE id = %s", lost)
    old = jobs.completed()
    age(sql, old, "2 days")
    result = celery_cli("maintain", "--json")
    assert result.code == 0, result
    report = json.loads(result.out)
    assert report["ran"] is True
    assert report["rescued"] == 1
    assert report["pruned"]["completed"] == 1
    assert store.job(lost).status == "queued"  # type: ignore[union-attr]
