"""The store's answers about time: the soonest scheduled job, expiry, both by the
database's clock."""

from __future__ import annotations

from datetime import timedelta

from store_factories import Db, new_job

from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import Store
from celery_pgqueue.store.jobs import MAX_PRIORITY_LEVELS


def soonest(store: Store, queues: list[str], came_due_within: float = 0.0) -> float | None:
    """Seconds until the soonest scheduled job of ``queues``, as a lone worker waits."""
    answer = store.next_due(queues, came_due_within)
    return min((seconds for seconds, _ in answer.values()), default=None)


def task_job(queue: str = "default", **fields: object):  # type: ignore[no-untyped-def]
    job = new_job(queue, **fields)
    payload = {"headers": {"task": "t.add", "id": str(job.id)}, "body": [[1, 2], {}, {}]}
    return new_job(queue, id=job.id, payload=payload, **fields)


def test_next_due_is_the_soonest_future_run_at_whatever_its_priority(store: Store, db: Db) -> None:
    """The index orders by priority first: a low-priority job due soonest still counts."""
    store.enqueue(
        [
            new_job(priority=0, delay_seconds=600),
            new_job(priority=5, delay_seconds=300),
            new_job(priority=900, delay_seconds=42),
            new_job(priority=5),  # due now: not "scheduled"
            new_job("other", delay_seconds=5),
        ]
    )
    seconds = soonest(store, ["default"])
    assert seconds is not None and 40 < seconds <= 42
    both = soonest(store, ["default", "other"])
    assert both is not None and 3 < both <= 5
    assert soonest(store, ["empty"]) is None
    assert soonest(store, []) is None


def test_next_due_counts_paused_queues_and_ignores_jobs_already_due(store: Store) -> None:
    """A paused queue's due jobs must not make an idle worker spin."""
    store.enqueue([new_job("paused"), new_job("paused", delay_seconds=30)])
    store.set_queue_active("paused", False)
    seconds = soonest(store, ["paused"])
    assert seconds is not None and 25 < seconds <= 30


def test_next_due_walks_a_bounded_number_of_priority_levels(store: Store) -> None:
    """Past the bound the answer may be later than the truth (the poll still covers)."""
    many = [new_job(priority=p, delay_seconds=600) for p in range(MAX_PRIORITY_LEVELS)]
    store.enqueue([*many, new_job(priority=MAX_PRIORITY_LEVELS + 1, delay_seconds=5)])
    seconds = soonest(store, ["default"])
    assert seconds is not None and seconds > 500


def test_a_claim_says_how_long_until_the_job_expires(store: Store) -> None:
    store.enqueue([task_job(ttl_seconds=90), task_job(priority=200)])
    expiring, forever = store.claim("default", 10, "worker")
    assert expiring.expires_in is not None and 85 < expiring.expires_in <= 90
    assert forever.expires_in is None


def test_expire_tasks_cancels_expired_tasks_only_and_logs_why(store: Store, db: Db) -> None:
    expired, live = task_job(ttl_seconds=60), task_job(ttl_seconds=60)
    reply = new_job(payload={"headers": {}, "body": "pong"}, ttl_seconds=60)
    store.enqueue([expired, live, reply])
    db.backdate_job(expired.id, "expires_at", 1)
    db.backdate_job(reply.id, "expires_at", 1)
    assert store.seconds_to_expiry([expired.id, live.id, reply.id]).keys() == {
        expired.id,
        live.id,
    }, "tasks only"
    assert store.seconds_to_expiry([expired.id])[expired.id] < 0

    assert store.expire_tasks([live.id]) == 0, "not expired yet"
    assert store.expire_tasks() == 1
    assert db.status(expired.id) == JobStatus.CANCELLED
    [log] = db.logs(expired.id)
    assert log["status"] == LogStatus.FAILED and log["log_message"].startswith("expired")
    assert db.job(expired.id)["last_error_message"] == "TaskRevokedError: expired"
    assert db.status(live.id) == JobStatus.QUEUED
    assert db.status(reply.id) == JobStatus.QUEUED, "transient: maintenance deletes it"
    assert store.drop_expired_messages() == 1
    assert store.claim("default", 10, "worker")[0].id == live.id


def test_delay_seconds_wins_over_run_at(store: Store, db: Db) -> None:
    job = new_job(run_at=db.now() - timedelta(hours=1), delay_seconds=60)
    store.enqueue([job])
    assert db.job(job.id)["run_at"] > db.now() + timedelta(seconds=55)


def test_next_due_can_count_jobs_that_came_due_a_moment_ago(store: Store, db: Db) -> None:
    """A claim just before the look-up may have missed a job that came due in between."""
    store.enqueue([new_job(run_at=db.now() - timedelta(seconds=0.5))])
    assert soonest(store, ["default"]) is None
    seconds = soonest(store, ["default"], came_due_within=5.0)
    assert seconds is not None and -5 < seconds < 0
    assert soonest(store, ["default"], came_due_within=0.1) is None, "older ones never count"
