"""Store.claim: order, due rows only, paused queues, TTL, what a claim records."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from store_factories import Db, new_job

from celery_pgqueue.store import Store


def test_claim_takes_lowest_priority_number_then_earliest_run_at_then_oldest(
    store: Store, db: Db
) -> None:
    now = db.now()
    early, late = now - timedelta(minutes=10), now - timedelta(minutes=1)
    # One enqueue per job: created_at is the tie-breaker, so enqueue order matters.
    order = {}
    for name, priority, run_at in [
        ("p5-late-first", 5, late),
        ("p5-late-second", 5, late),
        ("p1-late", 1, late),
        ("p5-early", 5, early),
        ("p0", 0, late),
        ("p9-early", 9, early),
    ]:
        job = new_job(priority=priority, run_at=run_at, payload={"name": name})
        store.enqueue([job])
        order[job.id] = name

    one_at_a_time = []
    while claimed := store.claim("default", 1, "worker"):
        one_at_a_time += [order[j.id] for j in claimed]

    assert one_at_a_time == [
        "p0",
        "p1-late",
        "p5-early",
        "p5-late-first",
        "p5-late-second",
        "p9-early",
    ]


def test_claim_returns_a_batch_in_claim_order(store: Store) -> None:
    jobs = [new_job(priority=p) for p in (30, 10, 20)]
    store.enqueue(jobs)

    claimed = store.claim("default", 10, "worker")

    assert [c.priority for c in claimed] == [10, 20, 30]


def test_claim_takes_only_due_jobs(store: Store, db: Db) -> None:
    due, scheduled = new_job(), new_job(run_at=db.now() + timedelta(hours=1))
    store.enqueue([due, scheduled])

    assert [c.id for c in store.claim("default", 10, "worker")] == [due.id]
    assert store.claim("default", 10, "worker") == []
    assert db.status(scheduled.id) == "queued"


def test_claim_reads_only_its_own_queue(store: Store) -> None:
    mine, other = new_job("mine"), new_job("other")
    store.enqueue([mine, other])

    assert [c.id for c in store.claim("mine", 10, "worker")] == [mine.id]


def test_claim_respects_the_limit(store: Store, db: Db) -> None:
    store.enqueue([new_job() for _ in range(7)])

    assert len(store.claim("default", 3, "worker")) == 3
    assert db.scalar("SELECT count(*) FROM jobs WHERE status = 'running'") == 3
    assert len(store.claim("default", 10, "worker")) == 4


def test_paused_queue_gives_nothing_and_resumed_queue_gives_again(store: Store) -> None:
    job = new_job("q")
    store.enqueue([job])

    store.set_queue_active("q", False)
    assert store.claim("q", 10, "worker") == []

    store.set_queue_active("q", True)
    assert [c.id for c in store.claim("q", 10, "worker")] == [job.id]


def test_claim_skips_messages_whose_ttl_has_passed(store: Store, db: Db) -> None:
    expired, fresh, plain = new_job(ttl_seconds=60), new_job(ttl_seconds=60), new_job()
    store.enqueue([expired, fresh, plain])
    db.backdate_job(expired.id, "expires_at", 1)

    claimed = {c.id for c in store.claim("default", 10, "worker")}

    assert claimed == {fresh.id, plain.id}
    assert db.status(expired.id) == "queued"


def test_claim_counts_the_attempt_sets_started_at_and_the_lease(
    make_store: Callable[..., Store], db: Db
) -> None:
    store = make_store(lease_seconds=45)
    job = new_job(max_attempts=3, payload={"task": "t", "args": [1]})
    store.enqueue([job])

    [claimed] = store.claim("default", 1, "host-1:pid-9")

    assert (claimed.id, claimed.queue_name, claimed.attempt, claimed.max_attempts) == (
        job.id,
        "default",
        1,
        3,
    )
    assert claimed.payload == {"task": "t", "args": [1]}
    row = db.job(job.id)
    assert row["status"] == "running"
    assert row["attempt_count"] == 1
    assert row["lease_owner"] == "host-1:pid-9"
    assert row["started_at"] == row["updated_at"]
    assert row["lease_expires_at"] - row["started_at"] == timedelta(seconds=45)


def test_each_claim_opens_one_attempting_log_row(store: Store, db: Db) -> None:
    job = new_job()
    store.enqueue([job])
    [first] = store.claim("default", 1, "worker")
    store.requeue([(job.id, first.attempt)])

    [second] = store.claim("default", 1, "worker")

    assert second.attempt == 2
    logs = db.logs(job.id)
    assert [(log["attempt_number"], log["status"]) for log in logs] == [
        (1, "retry"),
        (2, "attempting"),
    ]
    assert logs[1]["started_at"] == db.job(job.id)["started_at"]
    assert logs[1]["finished_at"] is None


def test_claim_on_a_queue_nobody_declared_returns_nothing(store: Store) -> None:
    assert store.claim("never-declared", 10, "worker") == []


def test_claimed_job_is_not_claimed_again(store: Store) -> None:
    store.enqueue([new_job()])
    assert len(store.claim("default", 10, "a")) == 1

    assert store.claim("default", 10, "b") == []
