"""status, pause, resume, set-priority, purge through the real command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from celery_pgqueue.store import Store

from .conftest import Jobs, Result

pytestmark = pytest.mark.slow


def test_status_reports_counts_ages_and_failures_per_queue(
    celery_cli: Callable[..., Result], jobs: Jobs, sql: Any
) -> None:
    jobs.running("default")
    jobs.completed("default")
    jobs.failed("default")
    jobs.cancelled("default")
    ready = jobs.queued("default")
    jobs.queued("default", run_at=None)
    sql("UPDATE jobs SET run_at = now() - interval '90 seconds' WHERE id = %s", ready)
    sql(
        "INSERT INTO jobs (id, queue_name, priority, run_at) "
        "VALUES (gen_random_uuid(), 'default', 100, now() + interval '1 hour')"
    )
    jobs.queued("emails")

    result = celery_cli("status", "--json")
    assert result.code == 0, result
    queues = {q["name"]: q for q in json.loads(result.out)["queues"]}
    assert set(queues) == {"default", "emails"}
    default = queues["default"]
    assert default["is_active"] is True
    assert (default["queued"], default["ready"], default["scheduled"]) == (3, 2, 1)
    assert (default["running"], default["completed"], default["failed"]) == (1, 1, 1)
    assert default["cancelled"] == 1
    assert 89 <= default["oldest_ready_seconds"] < 150
    assert default["longest_running_seconds"] >= 0
    assert default["failed_1h"] == 1 and default["completed_1h"] == 1
    assert default["failure_rate_1h"] == 0.5
    assert queues["emails"]["ready"] == 1


def test_status_table_is_aligned_for_people(
    celery_cli: Callable[..., Result], jobs: Jobs, sql: Any
) -> None:
    jobs.queued("default")
    jobs.queued("a-much-longer-queue-name")
    sql("UPDATE job_queues SET is_active = false WHERE name = 'default'")
    result = celery_cli("status")
    assert result.code == 0, result
    lines = result.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("QUEUE"))
    table = lines[header : header + 3]
    assert table[1].startswith("a-much-longer-queue-name  active")
    assert table[2].startswith("default                   paused")
    # Right-aligned numbers end where their header ends.
    end = table[0].index("READY") + len("READY")
    assert all(row[end - 1] == "1" for row in table[1:])


def test_status_hides_transient_queues_unless_all(
    celery_cli: Callable[..., Result], jobs: Jobs, sql: Any
) -> None:
    jobs.queued("default")
    sql(
        "INSERT INTO job_queues (name, expires_at) "
        "VALUES ('celery@host.celery.pidbox', now() + interval '10 seconds')"
    )
    hidden = json.loads(celery_cli("status", "--json").out)["queues"]
    assert [q["name"] for q in hidden] == ["default"]
    shown = json.loads(celery_cli("status", "--json", "--all").out)["queues"]
    assert [q["name"] for q in shown] == ["celery@host.celery.pidbox", "default"]


def test_status_running_lists_leases_and_flags_lapsed_ones(
    celery_cli: Callable[..., Result], jobs: Jobs, sql: Any
) -> None:
    live = jobs.running("default", task="proj.tasks.slow")
    stuck = jobs.running("default")
    sql(
        "UPDATE jobs SET lease_expires_at = now() - interval '5 minutes', "
        "started_at = now() - interval '10 minutes' WHERE id = %s",
        stuck,
    )
    result = celery_cli("status", "--running", "--json")
    assert result.code == 0, result
    document = json.loads(result.out)
    running = {r["id"]: r for r in document["running"]}
    assert running[str(live)]["task"] == "proj.tasks.slow"
    assert running[str(live)]["lease_expired"] is False
    assert running[str(stuck)]["lease_expired"] is True
    assert running[str(stuck)]["lease_remaining_seconds"] < -290
    assert document["running"][0]["id"] == str(stuck), "longest running first"
    assert document["queues"][0]["expired_leases"] == 1
    text = celery_cli("status", "--running")
    assert "lapsed 5m" in text.out


def test_status_with_no_queues_says_so(celery_cli: Callable[..., Result]) -> None:
    result = celery_cli("status")
    assert result.code == 0, result
    assert "no queues yet" in result.out


def test_pause_and_resume_flip_is_active(
    celery_cli: Callable[..., Result], jobs: Jobs, store: Store
) -> None:
    jobs.queued("default")
    jobs.queued("emails")
    paused = celery_cli("pause", "default", "emails")
    assert paused.code == 0, paused
    assert paused.out.splitlines() == ["paused default", "paused emails"]
    assert store.queue("default")["is_active"] is False
    assert store.queue("emails")["is_active"] is False
    assert store.claim("default", 10, owner="w") == []
    resumed = celery_cli("resume", "default")
    assert resumed.code == 0, resumed
    assert store.queue("default")["is_active"] is True
    assert store.queue("emails")["is_active"] is False


def test_pause_of_a_queue_with_no_row_yet_creates_it_paused(
    celery_cli: Callable[..., Result], jobs: Jobs, store: Store
) -> None:
    """As ``celery_pgqueue.api.pause``: pause a queue before its first task is sent."""
    jobs.queued("default")
    result = celery_cli("pause", "default", "reports")
    assert result.code == 0, result
    assert result.out.splitlines() == [
        "paused default",
        "paused reports (a new queue: no task was sent to it yet)",
    ]
    assert store.queue("reports")["is_active"] is False
    later = jobs.queued("reports")
    assert store.claim("reports", 10, owner="w") == []
    assert store.job(later).status == "queued"  # type: ignore[union-attr]


def test_an_unknown_queue_is_refused_listing_the_queues_that_exist(
    celery_cli: Callable[..., Result], jobs: Jobs, store: Store
) -> None:
    jobs.queued("default")
    jobs.queued("emails")
    for args in (("resume", "emails", "emials"), ("set-priority", "emials", "5")):
        result = celery_cli(*args)
        assert result.code == 3, result
        assert result.err.strip() == (
            "Error: no queue named 'emials'; did you mean 'emails'? (queues: 'default', 'emails')"
        ), result
    assert store.queue("emails")["is_active"] is True, "nothing changed"


def test_set_priority_changes_the_default_for_later_jobs(
    celery_cli: Callable[..., Result], jobs: Jobs, store: Store
) -> None:
    before = jobs.queued("default")
    result = celery_cli("set-priority", "default", "10")
    assert result.code == 0, result
    assert "100 -> 10" in result.out
    assert store.queue("default")["default_priority"] == 10
    after = jobs.queued("default")
    assert store.job(before).priority == 100  # type: ignore[union-attr]
    assert store.job(after).priority == 10  # type: ignore[union-attr]


def test_set_priority_rejects_a_non_number(celery_cli: Callable[..., Result], jobs: Jobs) -> None:
    jobs.queued("default")
    result = celery_cli("set-priority", "default", "high")
    assert result.code == 2, result


def test_purge_asks_then_deletes_only_waiting_jobs(
    celery_cli: Callable[..., Result], jobs: Jobs, store: Store
) -> None:
    running = jobs.running("default")
    waiting = [jobs.queued("default"), jobs.queued("default")]
    other = jobs.queued("emails")
    declined = celery_cli("purge", "default", stdin="n\n")
    assert declined.code == 1, declined
    assert all(store.job(j) for j in waiting)
    result = celery_cli("purge", "default", "--yes")
    assert result.code == 0, result
    assert "purged 2 waiting job(s) from default" in result.out
    assert not any(store.job(j) for j in waiting)
    assert store.job(running) is not None
    assert store.job(other) is not None


def test_purge_of_an_unknown_queue_exits_3(celery_cli: Callable[..., Result]) -> None:
    result = celery_cli("purge", "nope", "--yes")
    assert result.code == 3, result
    assert "no queue named 'nope' (there are no queues yet)" in result.err
