"""Store.enqueue_unique: at most one live job per unique key, enforced by the database.

The partial unique index ``ux_jobs_unique_key_live`` covers queued and running rows;
a duplicate publish reports the live job's id instead of inserting, a finished job
frees its key, and Celery's retry (the same task id re-published) is not refused by
the key its own row holds.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from store_factories import Db, new_job

from celery_pgqueue.store import Store


def test_the_index_refuses_a_second_live_row_with_the_same_key(store: Store, db: Db) -> None:
    first = new_job(unique_key="t.send:order-42")
    store.enqueue_unique(first)

    with pytest.raises(sa.exc.IntegrityError, match="ux_jobs_unique_key_live"):
        db.execute(
            "INSERT INTO jobs (id, queue_name, payload, priority, unique_key) "
            "VALUES (gen_random_uuid(), 'default', '{}', 100, 't.send:order-42')"
        )


def test_a_duplicate_publish_returns_the_live_jobs_id_and_inserts_nothing(
    store: Store, db: Db
) -> None:
    first = new_job(unique_key="t.send:order-42")
    second = new_job(unique_key="t.send:order-42")

    assert store.enqueue_unique(first).id == first.id
    assert store.enqueue_unique(second).id == first.id

    assert db.all("SELECT id, unique_key FROM jobs") == [(first.id, "t.send:order-42")]


def test_a_scheduled_job_holds_its_key_too(store: Store, db: Db) -> None:
    later = new_job(unique_key="k", delay_seconds=3600.0)
    assert store.enqueue_unique(later).id == later.id

    assert store.enqueue_unique(new_job(unique_key="k")).id == later.id
    assert db.scalar("SELECT count(*) FROM jobs") == 1


def test_other_keys_are_independent(store: Store, db: Db) -> None:
    a, b = new_job(unique_key="k-a"), new_job(unique_key="k-b")
    assert store.enqueue_unique(a).id == a.id
    assert store.enqueue_unique(b).id == b.id
    assert db.scalar("SELECT count(*) FROM jobs") == 2


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_a_finished_job_frees_its_key(store: Store, db: Db, status: str) -> None:
    first = new_job(unique_key="k")
    store.enqueue_unique(first)
    db.execute("UPDATE jobs SET status = :s WHERE id = :id", s=status, id=first.id)

    again = new_job(unique_key="k")
    assert store.enqueue_unique(again).id == again.id

    live = db.all("SELECT id FROM jobs WHERE status IN ('queued', 'running')")
    assert live == [(again.id,)]
    assert db.scalar("SELECT count(*) FROM jobs") == 2


def test_a_running_job_holds_its_key(store: Store, db: Db) -> None:
    first = new_job(unique_key="k")
    store.enqueue_unique(first)
    [claimed] = store.claim("default", 1, "w1")
    assert claimed.id == first.id

    assert store.enqueue_unique(new_job(unique_key="k")).id == first.id
    assert db.scalar("SELECT count(*) FROM jobs") == 1


def test_a_retry_of_the_same_id_is_requeued_not_refused_by_its_own_key(
    store: Store, db: Db
) -> None:
    first = new_job(unique_key="k", payload={"retries": 0})
    store.enqueue_unique(first)
    store.claim("default", 1, "w1")
    assert db.status(first.id) == "running"

    retry = new_job(id=first.id, unique_key="k", payload={"retries": 1}, delay_seconds=0.0)
    assert store.enqueue_unique(retry).id == first.id

    row = db.job(first.id)
    assert (row["status"], row["payload"], row["unique_key"]) == ("queued", {"retries": 1}, "k")
    assert row["attempt_count"] == 1
    assert db.scalar("SELECT count(*) FROM jobs") == 1


def test_a_plain_republish_of_a_unique_job_keeps_its_key(store: Store, db: Db) -> None:
    first = new_job(unique_key="k")
    store.enqueue_unique(first)
    store.claim("default", 1, "w1")

    store.enqueue([new_job(id=first.id, payload={"retries": 1})])

    assert (db.status(first.id), db.job(first.id)["unique_key"]) == ("queued", "k")
    assert store.enqueue_unique(new_job(unique_key="k")).id == first.id


def test_a_finished_unique_job_republished_by_id_runs_again_without_its_old_key(
    store: Store, db: Db
) -> None:
    first = new_job(unique_key="k")
    store.enqueue_unique(first)
    db.execute("UPDATE jobs SET status = 'completed' WHERE id = :id", id=first.id)
    newer = new_job(unique_key="k")
    store.enqueue_unique(newer)

    # The old id comes back (task_id= reused): it must not collide with the newer job.
    store.enqueue([new_job(id=first.id)])

    assert db.status(first.id) == "queued"
    assert db.job(first.id)["unique_key"] is None
    assert store.enqueue_unique(new_job(unique_key="k")).id == newer.id


def test_a_cancelled_job_republished_by_id_stays_cancelled(store: Store, db: Db) -> None:
    first = new_job(unique_key="k")
    store.enqueue_unique(first)
    db.execute("UPDATE jobs SET status = 'cancelled' WHERE id = :id", id=first.id)

    assert store.enqueue_unique(new_job(id=first.id, unique_key="k")).id == first.id
    assert db.status(first.id) == "cancelled"


def test_enqueue_unique_in_a_callers_transaction_rolls_back_with_it(store: Store, db: Db) -> None:
    first = new_job(unique_key="k")
    with store.engine.connect() as conn:
        with conn.begin() as outer:
            assert store.enqueue_unique(first, conn=conn).id == first.id
            outer.rollback()

    again = new_job(unique_key="k")
    assert store.enqueue_unique(again).id == again.id
    assert db.all("SELECT id FROM jobs") == [(again.id,)]


def test_a_duplicate_learns_the_holders_task_id_from_its_message(store: Store) -> None:
    holder = new_job(unique_key="k", payload={"headers": {"id": "order-42", "task": "t"}})
    store.enqueue_unique(holder)

    live = store.enqueue_unique(new_job(unique_key="k"))

    assert (live.id, live.task_id) == (holder.id, "order-42")
    assert store.enqueue_unique(new_job(id=holder.id, unique_key="k")).task_id is None


def test_an_operator_retry_of_a_failed_unique_job_never_collides_with_a_newer_holder(
    store: Store, db: Db
) -> None:
    failed = new_job(unique_key="k")
    store.enqueue_unique(failed)
    db.execute("UPDATE jobs SET status = 'failed' WHERE id = :id", id=failed.id)
    newer = new_job(unique_key="k")
    store.enqueue_unique(newer)

    assert store.retry([failed.id]) == 1

    assert (db.status(failed.id), db.job(failed.id)["unique_key"]) == ("queued", None)
    assert store.enqueue_unique(new_job(unique_key="k")).id == newer.id


def test_a_job_past_its_expires_frees_its_key_at_the_next_publish(store: Store, db: Db) -> None:
    # Celery would end it REVOKED ("expired") when a worker met it; until maintenance
    # or a claim got there, it kept answering duplicates with an id that never runs.
    task = {"headers": {"task": "t.send", "id": "first"}, "body": "[]"}
    first = new_job(unique_key="k", ttl_seconds=0.2, payload=task)
    assert store.enqueue_unique(first).id == first.id
    db.execute("UPDATE jobs SET expires_at = now() - interval '1 s' WHERE id = :id", id=first.id)

    second = new_job(unique_key="k", payload={**task, "headers": {**task["headers"], "id": "2"}})
    assert store.enqueue_unique(second).id == second.id

    assert db.scalar("SELECT status FROM jobs WHERE id = :id", id=first.id) == "cancelled"
    assert db.scalar("SELECT status FROM jobs WHERE id = :id", id=second.id) == "queued"
    assert "expired" in db.scalar(
        "SELECT log_message FROM job_logs WHERE job_id = :id", id=first.id
    )
