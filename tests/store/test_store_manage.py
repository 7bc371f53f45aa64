"""Operator actions on jobs: cancel, retry, purge, delete, and reading a job back."""

from __future__ import annotations

from datetime import timedelta

from store_factories import Db, new_job

from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import Store


def test_cancel_cancels_only_queued_jobs(store: Store, db: Db) -> None:
    queued, scheduled, running = (
        new_job(),
        new_job(run_at=db.now() + timedelta(hours=1)),
        new_job(),
    )
    store.enqueue([running])
    store.claim("default", 1, "worker")
    store.enqueue([queued, scheduled])

    assert store.cancel([queued.id, scheduled.id, running.id]) == 2

    assert db.status(queued.id) == "cancelled"
    assert db.status(scheduled.id) == "cancelled"
    assert db.status(running.id) == "running"
    assert store.claim("default", 10, "worker") == []


def test_cancelled_job_is_never_claimed(store: Store) -> None:
    job = new_job()
    store.enqueue([job])
    store.cancel([job.id])

    assert store.claim("default", 10, "worker") == []


def test_retry_requeues_failed_and_cancelled_jobs_and_keeps_their_history(
    store: Store, db: Db
) -> None:
    failed, cancelled, completed = new_job(), new_job(), new_job()
    store.enqueue([failed])
    [held] = store.claim("default", 1, "worker")
    store.finish(
        failed.id,
        attempt=held.attempt,
        status=JobStatus.FAILED,
        log_status=LogStatus.FAILED,
        error_message="boom",
    )
    store.enqueue([completed])
    [done] = store.claim("default", 1, "worker")
    store.finish(completed.id, attempt=done.attempt, status=JobStatus.COMPLETED, log_status=None)
    store.enqueue([cancelled])
    store.cancel([cancelled.id])

    assert store.retry([failed.id, cancelled.id, completed.id]) == 2

    row = db.job(failed.id)
    assert (row["status"], row["attempt_count"], row["failed_at"]) == ("queued", 1, None)
    assert row["run_at"] == row["updated_at"]
    assert [log["status"] for log in db.logs(failed.id)] == ["failed"]
    assert db.status(cancelled.id) == "queued"
    assert db.status(completed.id) == "completed"
    [again] = [c for c in store.claim("default", 10, "worker") if c.id == failed.id]
    assert again.attempt == 2


def test_retry_leaves_queued_and_running_jobs_alone(store: Store, db: Db) -> None:
    running, queued = new_job(), new_job()
    store.enqueue([running])
    store.claim("default", 1, "worker")
    store.enqueue([queued])

    assert store.retry([running.id, queued.id]) == 0
    assert db.status(running.id) == "running"


def test_purge_deletes_waiting_jobs_of_one_queue_only(store: Store, db: Db) -> None:
    running = new_job("q")
    store.enqueue([running])
    store.claim("q", 1, "worker")
    due, scheduled, elsewhere = (
        new_job("q"),
        new_job("q", run_at=db.now() + timedelta(days=1)),
        new_job("other"),
    )
    store.enqueue([due, scheduled, elsewhere])

    assert store.count_waiting("q") == 2
    assert store.purge("q") == 2

    remaining = {r[0] for r in db.all("SELECT id FROM jobs")}
    assert remaining == {running.id, elsewhere.id}
    assert store.count_waiting("q") == 0
    assert store.count_waiting("other") == 1


def test_delete_removes_jobs_and_their_logs(store: Store, db: Db) -> None:
    gone, kept = new_job(), new_job()
    store.enqueue([gone, kept])
    store.claim("default", 2, "worker")

    assert store.delete([gone.id]) == 1

    assert db.scalar("SELECT count(*) FROM jobs WHERE id = :id", id=gone.id) == 0
    assert db.scalar("SELECT count(*) FROM job_logs WHERE job_id = :id", id=gone.id) == 0
    assert db.scalar("SELECT count(*) FROM job_logs WHERE job_id = :id", id=kept.id) == 1


def test_delete_of_nothing_or_unknown_ids_is_zero(store: Store) -> None:
    assert store.delete([]) == 0
    assert store.delete([new_job().id]) == 0


def test_attempts_lists_a_jobs_log_rows_oldest_first(store: Store) -> None:
    job = new_job()
    store.enqueue([job])
    [first] = store.claim("default", 1, "worker")
    store.requeue([(job.id, first.attempt)])
    [second] = store.claim("default", 1, "worker")
    store.finish(
        job.id, attempt=second.attempt, status=JobStatus.COMPLETED, log_status=LogStatus.SUCCESS
    )

    attempts = store.attempts(job.id)

    assert [(a.attempt_number, a.status) for a in attempts] == [(1, "retry"), (2, "success")]
    assert all(a.job_id == job.id for a in attempts)
    assert all(a.duration_seconds is not None and a.duration_seconds >= 0 for a in attempts)


def test_job_reads_every_column_of_one_job_back(store: Store, db: Db) -> None:
    # Every jobs column must have a JobRecord field: Store.job builds it from the row.
    job = new_job(priority=3, ttl_seconds=60)
    store.enqueue([job])

    record = store.job(job.id)

    assert record is not None
    assert (record.id, record.status, record.priority) == (job.id, "queued", 3)
    assert record.expires_at == db.job(job.id)["expires_at"] is not None


def test_job_of_an_unknown_id_is_none(store: Store) -> None:
    assert store.job(new_job().id) is None
