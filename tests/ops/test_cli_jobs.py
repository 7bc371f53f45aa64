"""jobs, show, cancel, retry through the real command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celery_pgqueue.ids import job_id_for
from celery_pgqueue.store import Store

from .conftest import Jobs, Result

pytestmark = pytest.mark.slow


def listed(result: Result) -> list[str]:
    assert result.code == 0, result
    return [job["id"] for job in json.loads(result.out)]


def test_jobs_filters_by_queue_status_and_task(
    celery_cli: Callable[..., Result], jobs: Jobs
) -> None:
    add = jobs.queued("default", task="proj.tasks.add")
    mail = jobs.queued("emails", task="proj.tasks.mail")
    failed = jobs.failed("default", task="proj.tasks.add")
    assert set(listed(celery_cli("jobs", "--json"))) == {str(add), str(mail), str(failed)}
    assert listed(celery_cli("jobs", "--queue", "emails", "--json")) == [str(mail)]
    assert listed(celery_cli("jobs", "--status", "failed", "--json")) == [str(failed)]
    assert set(
        listed(celery_cli("jobs", "--status", "failed", "--status", "queued", "--json"))
    ) == {
        str(add),
        str(mail),
        str(failed),
    }
    assert set(listed(celery_cli("jobs", "--task", "proj.tasks.add", "--json"))) == {
        str(add),
        str(failed),
    }
    assert listed(
        celery_cli("jobs", "--task", "proj.tasks.add", "--status", "queued", "--json")
    ) == [str(add)]


def test_jobs_since_takes_durations_and_iso_times_and_limit_caps(
    celery_cli: Callable[..., Result], jobs: Jobs, sql: Any
) -> None:
    old = jobs.queued()
    new = jobs.queued()
    sql("UPDATE jobs SET updated_at = now() - interval '3 hours' WHERE id = %s", old)
    assert listed(celery_cli("jobs", "--since", "2h", "--json")) == [str(new)]
    assert set(listed(celery_cli("jobs", "--since", "1d", "--json"))) == {str(old), str(new)}
    # A naive ISO time means UTC.
    cutoff = (datetime.now(UTC) - timedelta(hours=1)).replace(tzinfo=None).isoformat()
    assert listed(celery_cli("jobs", "--since", cutoff, "--json")) == [str(new)]
    assert listed(celery_cli("jobs", "--limit", "1", "--json")) == [str(new)]


def test_jobs_scheduled_lists_countdown_and_eta_tasks_soonest_first(
    celery_cli: Callable[..., Result], jobs: Jobs
) -> None:
    """What ``celery inspect scheduled`` shows on Redis: here the rows wait in the database."""
    now = datetime.now(UTC)
    later = jobs.queued(run_at=now + timedelta(hours=2))
    sooner = jobs.queued("emails", task="proj.tasks.mail", run_at=now + timedelta(minutes=5))
    jobs.queued()  # due now: not scheduled
    jobs.failed()
    assert listed(celery_cli("jobs", "--scheduled", "--json")) == [str(sooner), str(later)]
    assert listed(celery_cli("jobs", "--scheduled", "--queue", "default", "--json")) == [str(later)]
    table = celery_cli("jobs", "--scheduled")
    assert table.code == 0, table
    header, first, second = table.out.splitlines()
    assert header.split()[:5] == ["ID", "QUEUE", "TASK", "RUN", "AT"]
    assert first.startswith(str(sooner)) and "proj.tasks.mail" in first
    assert second.startswith(str(later))
    refused = celery_cli("jobs", "--scheduled", "--status", "failed")
    assert refused.code == 2 and "--scheduled" in refused.err, refused


def test_jobs_rejects_a_bad_since(celery_cli: Callable[..., Result]) -> None:
    result = celery_cli("jobs", "--since", "yesterday")
    assert result.code == 2, result
    assert "duration" in result.err


def test_jobs_table_for_people_shows_task_and_error(
    celery_cli: Callable[..., Result], jobs: Jobs
) -> None:
    failed = jobs.failed(task="proj.tasks.add")
    result = celery_cli("jobs")
    assert result.code == 0, result
    header, row = result.out.splitlines()
    assert header.split()[:5] == ["ID", "QUEUE", "STATUS", "TASK", "ATTEMPTS"]
    assert row.startswith(str(failed))
    assert "proj.tasks.add" in row and "ValueError: boom" in row
    assert celery_cli("jobs", "--queue", "nothing-here").out.strip() == "no jobs match"


def test_show_prints_the_job_and_every_attempt(
    celery_cli: Callable[..., Result], jobs: Jobs
) -> None:
    job_id = jobs.failed(attempts=2)
    result = celery_cli("show", str(job_id))
    assert result.code == 0, result
    assert "id:" in result.out and str(job_id) in result.out
    assert "status:     failed" in result.out
    assert "last error: ValueError: boom" in result.out
    assert "attempt 1" in result.out and "attempt 2" in result.out
    assert "payload:" not in result.out, "the payload is shown only when asked for"
    document = json.loads(celery_cli("show", str(job_id), "--json").out)
    assert [a["status"] for a in document["attempts"]] == ["retry", "failed"]
    assert document["task"] == "proj.tasks.add"
    assert "payload" not in document
    with_payload = json.loads(celery_cli("show", str(job_id), "--json", "--payload").out)
    assert with_payload["payload"]["headers"]["task"] == "proj.tasks.add"


def test_show_accepts_a_custom_task_id(
    celery_cli: Callable[..., Result], store: Store, jobs: Jobs
) -> None:
    from celery_pgqueue.store import NewJob

    store.enqueue([NewJob(id=job_id_for("order-42"), queue_name="default", payload={})])
    result = celery_cli("show", "order-42")
    assert result.code == 0, result
    assert str(job_id_for("order-42")) in result.out


def test_show_of_an_unknown_id_exits_3(celery_cli: Callable[..., Result]) -> None:
    result = celery_cli("show", "5b0f3c9e-6a53-4c1e-9d7e-9a1c6f3d2b10")
    assert result.code == 3, result
    assert result.err.strip() == "Error: no job with id 5b0f3c9e-6a53-4c1e-9d7e-9a1c6f3d2b10"


def test_cancel_cancels_waiting_jobs_and_refuses_running_ones(
    celery_cli: Callable[..., Result], jobs: Jobs, store: Store
) -> None:
    waiting = jobs.queued()
    running = jobs.running()
    ok = celery_cli("cancel", str(waiting))
    assert ok.code == 0, ok
    assert ok.out.strip() == f"cancelled {waiting}"
    assert store.job(waiting).status == "cancelled"  # type: ignore[union-attr]
    refused = celery_cli("cancel", str(running))
    assert refused.code == 1, refused
    assert "it is running" in refused.err and "revoke" in refused.err
    assert store.job(running).status == "running"  # type: ignore[union-attr]


def test_cancel_with_an_unknown_id_still_cancels_the_known_ones_and_exits_3(
    celery_cli: Callable[..., Result], jobs: Jobs, store: Store
) -> None:
    waiting = jobs.queued()
    unknown = "00000000-0000-4000-8000-000000000000"
    result = celery_cli("cancel", str(waiting), unknown)
    assert result.code == 3, result
    assert f"{unknown}: no such job" in result.err
    assert store.job(waiting).status == "cancelled"  # type: ignore[union-attr]


def test_retry_requeues_a_failed_job_and_keeps_its_attempts(
    celery_cli: Callable[..., Result], jobs: Jobs, store: Store
) -> None:
    failed = jobs.failed(attempts=2)
    cancelled = jobs.cancelled()
    result = celery_cli("retry", str(failed), str(cancelled))
    assert result.code == 0, result
    assert result.out.splitlines() == [f"requeued {failed}", f"requeued {cancelled}"]
    job = store.job(failed)
    assert job is not None
    assert (job.status, job.attempt_count, job.failed_at) == ("queued", 2, None)
    assert [a.status for a in store.attempts(failed)] == ["retry", "failed"]
    assert store.job(cancelled).status == "queued"  # type: ignore[union-attr]
    claimed = store.claim("default", 10, owner="w")
    assert {c.id: c.attempt for c in claimed}[failed] == 3


def test_retry_refuses_jobs_that_have_not_failed(
    celery_cli: Callable[..., Result], jobs: Jobs, store: Store
) -> None:
    done = jobs.completed()
    result = celery_cli("retry", str(done))
    assert result.code == 1, result
    assert "it is completed; only failed or cancelled jobs can be retried" in result.err
    assert store.job(done).status == "completed"  # type: ignore[union-attr]


def test_a_malformed_id_is_never_a_traceback(celery_cli: Callable[..., Result]) -> None:
    result = celery_cli("cancel", "")
    assert result.code == 2, result
    assert "Traceback" not in result.err
