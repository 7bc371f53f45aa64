"""Store.enqueue: one row per job, defaults from the queue and the database clock,
re-publish of a task id, durable cancel, NOTIFY at commit, message TTL."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

from store_factories import Db, new_job, notifications_up_to_marker

from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import Store
from celery_pgqueue.store.listener import Listener, wake_note


def test_enqueue_inserts_one_queued_row_per_job(store: Store, db: Db) -> None:
    batch = [new_job(payload={"n": n}) for n in range(3)]

    assert store.enqueue(batch) == 3

    rows = db.all("SELECT id, status, attempt_count, payload->>'n' FROM jobs ORDER BY 4")
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (job.id, "queued", 0, str(n)) for n, job in enumerate(batch)
    ]


def test_enqueue_of_nothing_writes_nothing(store: Store, db: Db) -> None:
    assert store.enqueue([]) == 0
    assert db.scalar("SELECT count(*) FROM jobs") == 0


def test_enqueue_creates_the_queue_with_the_options_default_priority(
    make_store: Callable[..., Store], db: Db
) -> None:
    store = make_store(default_priority=42)
    job = new_job("fresh")

    store.enqueue([job])

    assert db.scalar("SELECT default_priority FROM job_queues WHERE name = 'fresh'") == 42
    assert db.job(job.id)["priority"] == 42


def test_priority_none_takes_the_queues_default_priority(store: Store, db: Db) -> None:
    store.ensure_queues(["q"])
    store.set_queue_priority("q", 7)
    job = new_job("q", priority=None)

    store.enqueue([job])

    assert db.job(job.id)["priority"] == 7


def test_explicit_priority_zero_is_kept_not_replaced_by_the_default(store: Store, db: Db) -> None:
    store.ensure_queues(["q"])
    store.set_queue_priority("q", 50)
    zero, nine = new_job("q", priority=0), new_job("q", priority=9)

    store.enqueue([zero, nine])

    assert db.job(zero.id)["priority"] == 0
    assert db.job(nine.id)["priority"] == 9


def test_run_at_defaults_to_the_database_clock_of_the_enqueue(store: Store) -> None:
    job = new_job()
    with store.engine.begin() as conn:
        store.enqueue([job], conn=conn)
        run_at, now = conn.exec_driver_sql(
            "SELECT run_at, now() FROM jobs WHERE id = %(id)s", {"id": job.id}
        ).one()

    assert run_at == now


def test_explicit_run_at_is_stored(store: Store, db: Db) -> None:
    later = db.now() + timedelta(hours=2)
    job = new_job(run_at=later)

    store.enqueue([job])

    assert db.job(job.id)["run_at"] == later


def test_reenqueue_of_existing_id_requeues_with_new_run_at_and_keeps_history(
    store: Store, db: Db
) -> None:
    job = new_job(payload={"v": 1})
    store.enqueue([job])
    [claimed] = store.claim("default", 1, "worker-1")
    assert store.finish(
        job.id,
        attempt=claimed.attempt,
        status=JobStatus.FAILED,
        log_status=LogStatus.FAILED,
        error_message="boom",
    )
    later = db.now() + timedelta(minutes=5)

    assert store.enqueue([new_job(id=job.id, payload={"v": 2}, run_at=later)]) == 1

    row = db.job(job.id)
    assert row["status"] == "queued"
    assert row["run_at"] == later
    assert row["payload"] == {"v": 2}
    assert row["attempt_count"] == 1
    assert row["lease_owner"] is None and row["lease_expires_at"] is None
    assert [log["status"] for log in db.logs(job.id)] == ["failed"]
    assert db.scalar("SELECT count(*) FROM jobs") == 1


def test_reenqueue_while_running_releases_the_lease(store: Store, db: Db) -> None:
    # Celery's retry re-publishes the task id before the running delivery is acked.
    job = new_job()
    store.enqueue([job])
    store.claim("default", 1, "worker-1")

    store.enqueue([new_job(id=job.id)])

    row = db.job(job.id)
    assert (row["status"], row["attempt_count"], row["lease_owner"]) == ("queued", 1, None)
    assert len(db.logs(job.id)) == 1


def test_cancelled_job_stays_cancelled_when_enqueued_again(store: Store, db: Db) -> None:
    job = new_job(payload={"v": 1})
    store.enqueue([job])
    assert store.cancel([job.id]) == 1

    assert store.enqueue([new_job(id=job.id, payload={"v": 2})]) == 0

    row = db.job(job.id)
    assert (row["status"], row["payload"]) == ("cancelled", {"v": 1})


def test_enqueue_notifies_workers_only_when_the_transaction_commits(
    store: Store, db: Db, listener: Listener, database_url: str
) -> None:
    with store.engine.begin() as conn:
        store.enqueue([new_job("q")], conn=conn)
        before_commit = notifications_up_to_marker(listener, database_url, store.channel)
    after_commit = notifications_up_to_marker(listener, database_url, store.channel)

    assert before_commit == []
    assert after_commit == ["q"]


def test_enqueue_notifies_due_queues_and_when_each_queues_soonest_new_job_comes_due(
    store: Store, db: Db, listener: Listener, database_url: str
) -> None:
    later = db.now() + timedelta(hours=1)
    store.enqueue(
        [
            new_job("due"),
            new_job("due"),
            new_job("due", run_at=later + timedelta(minutes=1)),
            new_job("scheduled", run_at=later + timedelta(minutes=5)),
            new_job("scheduled", delay_seconds=1800),
        ]
    )

    payloads = notifications_up_to_marker(listener, database_url, store.channel)
    notes = [wake_note(payload) for payload in payloads]
    assert sorted(queue for queue, seconds, _ in notes if seconds is None) == ["due"]
    scheduled = {queue: seconds for queue, seconds, _ in notes if seconds is not None}
    assert sorted(scheduled) == ["due", "scheduled"], "one per queue"
    assert 3600 < scheduled["due"] <= 3660
    assert 1799 < scheduled["scheduled"] <= 1800, "the soonest of the queue's new jobs"


def test_enqueue_sends_no_notify_when_use_notify_is_off(
    make_store: Callable[..., Store], listener: Listener, database_url: str
) -> None:
    quiet = make_store(use_notify=False)

    quiet.enqueue([new_job("q")])

    assert notifications_up_to_marker(listener, database_url, quiet.channel) == []


def test_ttl_and_delay_count_from_the_statement_by_the_database_clock(store: Store, db: Db) -> None:
    """Inside a caller's transaction that began a while ago, an interval is not shortened
    by the transaction's age (``now()`` is when it began)."""
    short, later, plain = new_job(ttl_seconds=90.5), new_job(delay_seconds=30), new_job()
    with store.engine.begin() as conn:
        began = conn.exec_driver_sql("SELECT now()").scalar_one()
        conn.exec_driver_sql("SELECT pg_sleep(0.3)")
        store.enqueue([short, later, plain], conn=conn)
        after = conn.exec_driver_sql("SELECT clock_timestamp()").scalar_one()

    expires_at = db.job(short.id)["expires_at"]
    assert began + timedelta(seconds=90.8) <= expires_at <= after + timedelta(seconds=90.5)
    run_at = db.job(later.id)["run_at"]
    assert began + timedelta(seconds=30.3) <= run_at <= after + timedelta(seconds=30)
    assert db.job(plain.id)["expires_at"] is None


def test_enqueue_inside_a_rolled_back_transaction_leaves_nothing(store: Store, db: Db) -> None:
    with store.engine.connect() as conn:
        with conn.begin() as transaction:
            store.enqueue([new_job("rolled")], conn=conn)
            transaction.rollback()

    assert db.scalar("SELECT count(*) FROM jobs") == 0


def test_enqueue_stores_max_attempts_and_keeps_it_when_republished_without(
    store: Store, db: Db
) -> None:
    job_id = uuid.uuid4()
    store.enqueue([new_job(id=job_id, max_attempts=3)])
    store.enqueue([new_job(id=job_id)])

    assert db.job(job_id)["max_attempts"] == 3
