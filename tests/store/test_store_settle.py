"""What happens to a held job: ack, requeue, finish, heartbeat, rescue after a lost worker.

Every write is fenced by the attempt that was delivered, so a late write from an old
delivery never touches a newer attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from uuid import UUID

import pytest
from store_factories import Db, new_job

from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import ClaimedJob, Store


def enqueue_and_claim(store: Store, owner: str = "worker", **fields: object) -> ClaimedJob:
    job = new_job(**fields)
    store.enqueue([job])
    [claimed] = store.claim("default", 1, owner)
    assert claimed.id == job.id
    return claimed


# -- mark_acked ---------------------------------------------------------------------


def test_mark_acked_records_the_ack_of_the_current_attempt(store: Store, db: Db) -> None:
    held = enqueue_and_claim(store)

    assert store.mark_acked([(held.id, held.attempt)]) == 1

    row = db.job(held.id)
    assert row["acked_at"] is not None
    assert row["status"] == "running"


def test_mark_acked_ignores_a_stale_attempt_and_a_second_ack(store: Store, db: Db) -> None:
    held = enqueue_and_claim(store)

    assert store.mark_acked([(held.id, held.attempt + 1)]) == 0
    assert db.job(held.id)["acked_at"] is None
    assert store.mark_acked([(held.id, held.attempt)]) == 1
    first_ack = db.job(held.id)["acked_at"]
    assert store.mark_acked([(held.id, held.attempt)]) == 0
    assert db.job(held.id)["acked_at"] == first_ack


def test_mark_acked_of_nothing_is_zero(store: Store) -> None:
    assert store.mark_acked([]) == 0


# -- requeue ------------------------------------------------------------------------


def test_requeue_puts_the_job_back_and_closes_its_attempt_as_retry(store: Store, db: Db) -> None:
    held = enqueue_and_claim(store)

    assert store.requeue([(held.id, held.attempt)]) == 1

    row = db.job(held.id)
    assert (row["status"], row["attempt_count"]) == ("queued", 1)
    assert row["lease_owner"] is None and row["lease_expires_at"] is None
    [log] = db.logs(held.id)
    assert (log["status"], log["attempt_number"]) == ("retry", 1)
    assert log["finished_at"] is not None
    assert log["duration"] == log["finished_at"] - log["started_at"]
    assert [c.id for c in store.claim("default", 1, "other")] == [held.id]


def test_requeue_with_a_stale_attempt_changes_nothing(store: Store, db: Db) -> None:
    held = enqueue_and_claim(store)
    store.requeue([(held.id, held.attempt)])
    [again] = store.claim("default", 1, "worker-2")

    assert store.requeue([(held.id, held.attempt)]) == 0

    row = db.job(held.id)
    assert (row["status"], row["attempt_count"], row["lease_owner"]) == (
        "running",
        again.attempt,
        "worker-2",
    )
    assert [log["status"] for log in db.logs(held.id)] == ["retry", "attempting"]


def test_requeue_never_reruns_finished_work(store: Store, db: Db) -> None:
    held = enqueue_and_claim(store)
    store.finish(
        held.id, attempt=held.attempt, status=JobStatus.COMPLETED, log_status=LogStatus.SUCCESS
    )

    assert store.requeue([(held.id, held.attempt)]) == 0
    assert db.status(held.id) == "completed"


# -- finish -------------------------------------------------------------------------


def test_finish_completed_sets_completed_at_and_closes_the_log_with_duration(
    store: Store, db: Db
) -> None:
    held = enqueue_and_claim(store)

    assert store.finish(
        held.id,
        attempt=held.attempt,
        status=JobStatus.COMPLETED,
        log_status=LogStatus.SUCCESS,
        log_message="done",
    )

    row = db.job(held.id)
    assert row["status"] == "completed"
    assert row["completed_at"] is not None and row["failed_at"] is None
    assert row["lease_owner"] is None and row["lease_expires_at"] is None
    [log] = db.logs(held.id)
    assert (log["status"], log["log_message"]) == ("success", "done")
    assert log["finished_at"] == row["completed_at"]
    assert log["duration"] == log["finished_at"] - log["started_at"]
    assert log["duration"] >= timedelta(0)


def test_finish_failed_keeps_the_first_255_characters_of_the_error(store: Store, db: Db) -> None:
    held = enqueue_and_claim(store)
    error = "ValueError: " + "é" * 300

    assert store.finish(
        held.id,
        attempt=held.attempt,
        status=JobStatus.FAILED,
        log_status=LogStatus.FAILED,
        error_message=error,
    )

    row = db.job(held.id)
    assert row["status"] == "failed"
    assert row["failed_at"] is not None and row["completed_at"] is None
    assert row["last_error_message"] == error[:255]
    assert db.logs(held.id)[0]["status"] == "failed"


def test_finish_from_a_stale_attempt_is_fenced_out(store: Store, db: Db) -> None:
    held = enqueue_and_claim(store)
    store.requeue([(held.id, held.attempt)])
    [again] = store.claim("default", 1, "worker-2")

    assert not store.finish(held.id, attempt=held.attempt, status=JobStatus.FAILED, log_status=None)

    row = db.job(held.id)
    assert (row["status"], row["attempt_count"], row["failed_at"]) == (
        "running",
        again.attempt,
        None,
    )
    assert db.logs(held.id)[1]["status"] == "attempting"


def test_finish_never_overwrites_a_completed_job(store: Store, db: Db) -> None:
    held = enqueue_and_claim(store)
    store.finish(
        held.id, attempt=held.attempt, status=JobStatus.COMPLETED, log_status=LogStatus.SUCCESS
    )

    for attempt in (held.attempt, None):
        assert not store.finish(
            held.id,
            attempt=attempt,
            status=JobStatus.FAILED,
            log_status=LogStatus.FAILED,
            error_message="late",
        )

    row = db.job(held.id)
    assert (row["status"], row["last_error_message"], row["failed_at"]) == (
        "completed",
        None,
        None,
    )
    assert [log["status"] for log in db.logs(held.id)] == ["success"]


def test_finish_of_an_unknown_job_is_false(store: Store) -> None:
    assert not store.finish(
        UUID(int=1), attempt=None, status=JobStatus.COMPLETED, log_status=LogStatus.SUCCESS
    )


# -- heartbeat ----------------------------------------------------------------------


def test_heartbeat_extends_only_the_listed_jobs_of_that_owner(
    make_store: Callable[..., Store], db: Db
) -> None:
    store = make_store(lease_seconds=60)
    store.enqueue([new_job("a"), new_job("a"), new_job("b")])
    listed, unlisted = store.claim("a", 2, "owner-a")
    [others] = store.claim("b", 1, "owner-b")
    for job_id in (listed.id, unlisted.id, others.id):
        db.backdate_job(job_id, "lease_expires_at", 5)

    assert store.heartbeat("owner-a", [listed.id, others.id]) == 1
    now = db.now()

    assert db.job(listed.id)["lease_expires_at"] > now + timedelta(seconds=50)
    assert db.job(unlisted.id)["lease_expires_at"] < now
    assert db.job(others.id)["lease_expires_at"] < now


def test_heartbeat_does_not_revive_a_finished_job(store: Store, db: Db) -> None:
    held = enqueue_and_claim(store, owner="owner-a")
    store.finish(
        held.id, attempt=held.attempt, status=JobStatus.COMPLETED, log_status=LogStatus.SUCCESS
    )

    assert store.heartbeat("owner-a", [held.id]) == 0
    assert db.job(held.id)["lease_expires_at"] is None


# -- rescue_expired -----------------------------------------------------------------


def test_rescue_requeues_unacked_fails_acked_and_exhausted_and_closes_their_logs(
    store: Store, db: Db
) -> None:
    unacked = enqueue_and_claim(store, owner="host-1")
    acked = enqueue_and_claim(store, owner="host-2")
    exhausted = enqueue_and_claim(store, owner="host-3", max_attempts=1)
    alive = enqueue_and_claim(store, owner="host-4")
    store.mark_acked([(acked.id, acked.attempt)])
    for held in (unacked, acked, exhausted):
        db.backdate_job(held.id, "lease_expires_at", 1)

    assert store.rescue_expired() == (1, 2)

    requeued = db.job(unacked.id)
    assert (requeued["status"], requeued["lease_owner"], requeued["failed_at"]) == (
        "queued",
        None,
        None,
    )
    lost = db.job(acked.id)
    assert lost["status"] == "failed" and lost["failed_at"] is not None
    assert lost["last_error_message"].startswith("WorkerLostError")
    assert "host-2" in lost["last_error_message"]
    spent = db.job(exhausted.id)
    assert spent["status"] == "failed"
    assert "max_attempts" in spent["last_error_message"]
    assert db.job(alive.id)["status"] == "running"

    assert [log["status"] for log in db.logs(unacked.id)] == ["retry"]
    assert [log["status"] for log in db.logs(acked.id)] == ["failed"]
    assert [log["status"] for log in db.logs(exhausted.id)] == ["failed"]
    assert [log["status"] for log in db.logs(alive.id)] == ["attempting"]
    for held in (unacked, acked, exhausted):
        [log] = db.logs(held.id)
        assert log["finished_at"] is not None and log["duration"] is not None


def test_rescued_job_is_claimed_again_as_the_next_attempt(store: Store, db: Db) -> None:
    held = enqueue_and_claim(store, max_attempts=2)
    db.backdate_job(held.id, "lease_expires_at", 1)
    store.rescue_expired()

    [again] = store.claim("default", 1, "worker-2")

    assert (again.id, again.attempt) == (held.id, 2)


def test_rescue_with_nothing_expired_changes_nothing(store: Store, db: Db) -> None:
    held = enqueue_and_claim(store)

    assert store.rescue_expired() == (0, 0)
    assert db.status(held.id) == "running"


@pytest.mark.parametrize("limit", [1, 2])
def test_rescue_takes_at_most_limit_jobs_per_call(store: Store, db: Db, limit: int) -> None:
    held = [enqueue_and_claim(store) for _ in range(3)]
    for job in held:
        db.backdate_job(job.id, "lease_expires_at", 1)

    assert store.rescue_expired(limit=limit) == (limit, 0)
    assert db.scalar("SELECT count(*) FROM jobs WHERE status = 'queued'") == limit
