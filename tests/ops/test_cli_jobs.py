"""jobs, show, cancel, retry through the real command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from celery import Celery

from celery_pgqueue.ids import job_id_for
from celery_pgqueue.states import JobStatus
from celery_pgqueue.store import Store

from .conftest import Jobs, Result, pgqueue_url

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
    header, row, *_legend = result.out.splitlines()
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


def test_jobs_and_show_explain_the_attempts_column(
    celery_cli: Callable[..., Result], jobs: Jobs, store: Store
) -> None:
    failed = jobs.failed(attempts=2)
    store.finish(failed, attempt=None, status=JobStatus.FAILED, log_status=None, max_attempts=3)
    listing = celery_cli("jobs")
    assert listing.code == 0, listing
    assert "2/3" in listing.out.splitlines()[1]
    assert "ATTEMPTS: times a worker took the job / most it may take (max_retries + 1)" in (
        listing.out
    )
    shown = celery_cli("show", str(failed))
    assert shown.code == 0, shown
    assert "attempts:   2 of at most 3 (times a worker took it; max_retries + 1)" in shown.out


def test_show_accepts_a_unique_id_prefix_and_says_when_one_is_ambiguous(
    celery_cli: Callable[..., Result], jobs: Jobs
) -> None:
    first = jobs.queued(job_id=UUID("abcd1111-0000-4000-8000-000000000001"))
    second = jobs.queued(job_id=UUID("abcd2222-0000-4000-8000-000000000002"))
    unique = celery_cli("show", "abcd1")
    assert unique.code == 0, unique
    assert f"id:         {first}" in unique.out
    with_dash = celery_cli("show", "ABCD2222-0")
    assert with_dash.code == 0, with_dash
    assert str(second) in with_dash.out
    ambiguous = celery_cli("show", "abcd")
    assert ambiguous.code == 2, ambiguous
    assert "job id prefix 'abcd' is ambiguous" in ambiguous.err
    assert str(first) in ambiguous.err and str(second) in ambiguous.err
    nothing = celery_cli("show", "abce")
    assert nothing.code == 3, nothing
    assert "no job with id or id prefix 'abce'" in nothing.err


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


def test_retry_refuses_a_job_cancelled_by_revoke_and_says_why(
    celery_cli: Callable[..., Result], jobs: Jobs, store: Store, database_url: str
) -> None:
    """Workers remember revoked ids: a requeued revoked job would be cancelled again."""
    revoked = jobs.queued()
    app = Celery("revoker", broker=pgqueue_url(database_url), set_as_current=False)
    try:
        app.control.revoke(str(revoked))
    finally:
        app.close()
    assert store.job(revoked).status == "cancelled"  # type: ignore[union-attr]
    operator_cancelled = jobs.queued()
    assert celery_cli("cancel", str(operator_cancelled)).code == 0
    result = celery_cli("retry", str(revoked), str(operator_cancelled))
    assert result.code == 1, result
    assert result.out.splitlines() == [f"requeued {operator_cancelled}"]
    assert f"{revoked}: not requeued: it was cancelled by revoke()" in result.err
    assert "workers remember revoked ids" in result.err
    assert store.job(revoked).status == "cancelled"  # type: ignore[union-attr]
    assert store.job(operator_cancelled).status == "queued"  # type: ignore[union-attr]


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
