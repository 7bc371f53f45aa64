"""Retention: finished jobs and job_logs are deleted by age and cap, in short batches.

Ages are set by moving timestamps into the past with SQL, never by waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

import pytest
from store_factories import Db, new_job

from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import PruneCounts, Store

COMPLETED_RETENTION = 600.0
FAILED_RETENTION = 3_600.0
LOG_RETENTION = 1_800.0


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    return make_store(
        failed_retention=FAILED_RETENTION, log_retention=LOG_RETENTION, max_logs_per_job=2
    )


def jobs_in(store: Store, db: Db, count: int, status: str, age: float) -> list[UUID]:
    """``count`` jobs in ``status`` whose last change was ``age`` seconds ago."""
    batch = [new_job() for _ in range(count)]
    store.enqueue(batch)
    ids = [job.id for job in batch]
    db.execute(
        "UPDATE jobs SET status = :status, updated_at = now() - make_interval(secs => :age)"
        " WHERE id = ANY(:ids)",
        status=status,
        age=age,
        ids=ids,
    )
    return ids


def remaining(db: Db, ids: list[UUID]) -> int:
    count: int = db.scalar("SELECT count(*) FROM jobs WHERE id = ANY(:ids)", ids=ids)
    return count


def backdate_log(db: Db, job_id: UUID, attempt: int, seconds: float) -> None:
    db.execute(
        "UPDATE job_logs SET started_at = started_at - make_interval(secs => :s)"
        " WHERE job_id = :id AND attempt_number = :n",
        s=seconds,
        id=job_id,
        n=attempt,
    )


def finished_jobs_by_age(store: Store, db: Db) -> dict[str, list[UUID]]:
    return {
        "completed_old": jobs_in(store, db, 3, "completed", COMPLETED_RETENTION + 100),
        "completed_young": jobs_in(store, db, 2, "completed", COMPLETED_RETENTION - 100),
        "cancelled_old": jobs_in(store, db, 1, "cancelled", COMPLETED_RETENTION + 100),
        "cancelled_young": jobs_in(store, db, 1, "cancelled", 10),
        "failed_old": jobs_in(store, db, 2, "failed", FAILED_RETENTION + 100),
        # Older than completed_retention but within failed_retention: kept.
        "failed_young": jobs_in(store, db, 1, "failed", COMPLETED_RETENTION + 100),
        "queued_ancient": jobs_in(store, db, 1, "queued", 10 * FAILED_RETENTION),
        "running_ancient": jobs_in(store, db, 1, "running", 10 * FAILED_RETENTION),
    }


def test_prune_deletes_finished_jobs_past_their_retention_and_keeps_the_rest(
    store: Store, db: Db
) -> None:
    groups = finished_jobs_by_age(store, db)

    counts = store.prune(completed_retention=COMPLETED_RETENTION)

    assert counts == PruneCounts(completed=3, cancelled=1, failed=2, logs=0)
    for name, ids in groups.items():
        expected = 0 if name.endswith("_old") else len(ids)
        assert remaining(db, ids) == expected, name


def test_prune_dry_run_counts_without_deleting(store: Store, db: Db) -> None:
    groups = finished_jobs_by_age(store, db)
    before = db.scalar("SELECT count(*) FROM jobs")

    counts = store.prune(completed_retention=COMPLETED_RETENTION, dry_run=True)

    assert counts == PruneCounts(completed=3, cancelled=1, failed=2, logs=0)
    assert db.scalar("SELECT count(*) FROM jobs") == before
    assert remaining(db, groups["completed_old"]) == 3


def test_prune_works_through_every_batch(make_store: Callable[..., Store], db: Db) -> None:
    store = make_store(prune_batch_size=10)
    old = jobs_in(store, db, 35, "completed", 1_000)
    young = jobs_in(store, db, 3, "completed", 1)

    counts = store.prune(completed_retention=100)

    assert counts.completed == 35
    assert remaining(db, old) == 0
    assert remaining(db, young) == 3


def test_prune_removes_old_logs_in_batches(make_store: Callable[..., Store], db: Db) -> None:
    store = make_store(prune_batch_size=10, log_retention=100)
    batch = [new_job() for _ in range(35)]
    store.enqueue(batch)
    for held in store.claim("default", 35, "worker"):
        store.finish(
            held.id, attempt=held.attempt, status=JobStatus.COMPLETED, log_status=LogStatus.SUCCESS
        )
    db.execute("UPDATE job_logs SET started_at = started_at - interval '1000 seconds'")

    counts = store.prune(completed_retention=10_000)

    assert counts == PruneCounts(logs=35)
    assert db.scalar("SELECT count(*) FROM job_logs") == 0
    assert db.scalar("SELECT count(*) FROM jobs") == 35


def run_attempts(store: Store, queue: str, times: int, finish: JobStatus | None) -> None:
    """Claim the one job of ``queue`` ``times`` times, requeueing in between; then
    finish the last attempt with ``finish`` or leave it running."""
    for n in range(1, times + 1):
        [held] = store.claim(queue, 1, "worker")
        if n < times:
            store.requeue([(held.id, held.attempt)])
        elif finish is not None:
            log = LogStatus.SUCCESS if finish is JobStatus.COMPLETED else LogStatus.FAILED
            store.finish(held.id, attempt=held.attempt, status=finish, log_status=log)


def logs_by_age_and_cap(store: Store, db: Db) -> dict[str, UUID]:
    """One job per queue whose logs prune must treat differently (max_logs_per_job=2)."""
    named = {name: new_job(name) for name in ("retried", "old", "open", "young")}
    store.enqueue(list(named.values()))
    ids = {name: job.id for name, job in named.items()}
    # Five closed attempts: 1-3 are over the cap of 2. Attempt 1 is also past
    # log_retention: it must be deleted, and counted, once.
    run_attempts(store, "retried", 5, JobStatus.COMPLETED)
    backdate_log(db, ids["retried"], 1, LOG_RETENTION + 100)
    # One closed attempt past log_retention: deleted.
    run_attempts(store, "old", 1, JobStatus.COMPLETED)
    backdate_log(db, ids["old"], 1, LOG_RETENTION + 100)
    # One attempt still running, started long ago: an open attempt is never pruned.
    run_attempts(store, "open", 1, None)
    backdate_log(db, ids["open"], 1, LOG_RETENTION + 100)
    # One recent closed attempt: kept.
    run_attempts(store, "young", 1, JobStatus.FAILED)
    return ids


def attempt_numbers(db: Db, job_id: UUID) -> list[int]:
    return [log["attempt_number"] for log in db.logs(job_id)]


def test_prune_deletes_logs_by_age_and_beyond_max_logs_per_job(store: Store, db: Db) -> None:
    ids = logs_by_age_and_cap(store, db)

    counts = store.prune(completed_retention=COMPLETED_RETENTION)

    assert counts == PruneCounts(logs=4)
    assert attempt_numbers(db, ids["retried"]) == [4, 5]
    assert attempt_numbers(db, ids["old"]) == []
    assert attempt_numbers(db, ids["open"]) == [1]
    assert attempt_numbers(db, ids["young"]) == [1]


def test_pruned_jobs_take_their_logs_without_counting_them_as_logs(store: Store, db: Db) -> None:
    job = new_job()
    store.enqueue([job])
    run_attempts(store, "default", 1, JobStatus.COMPLETED)
    db.backdate_job(job.id, "updated_at", COMPLETED_RETENTION + 100)
    backdate_log(db, job.id, 1, LOG_RETENTION + 100)

    counts = store.prune(completed_retention=COMPLETED_RETENTION)

    assert counts == PruneCounts(completed=1, logs=0)
    assert db.scalar("SELECT count(*) FROM job_logs") == 0


def test_prunable_reports_exactly_what_prune_then_deletes(store: Store, db: Db) -> None:
    finished_jobs_by_age(store, db)
    logs_by_age_and_cap(store, db)

    predicted = store.prunable(completed_retention=COMPLETED_RETENTION)
    pruned = store.prune(completed_retention=COMPLETED_RETENTION)

    assert predicted == pruned == PruneCounts(completed=3, cancelled=1, failed=2, logs=4)


def test_prune_dry_run_counts_past_one_batch(make_store: Callable[..., Store], db: Db) -> None:
    store = make_store(prune_batch_size=10)
    jobs_in(store, db, 35, "completed", 1_000)

    assert store.prune(completed_retention=100, dry_run=True).completed == 35


def test_prune_dry_run_counts_each_log_once(store: Store, db: Db) -> None:
    logs_by_age_and_cap(store, db)

    assert store.prune(completed_retention=COMPLETED_RETENTION, dry_run=True).logs == 4
