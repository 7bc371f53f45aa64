"""The per-task statements once they run through psycopg directly (``store/hot.py``).

Statements go through SQLAlchemy only while someone listens to the engine's cursor
events; these tests also warm the statements up (psycopg prepares one on its fifth
run), so what they check happens on the prepared direct path: the same rows, and the
same named errors, as through SQLAlchemy.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from store_factories import Db, new_job

from celery_pgqueue.errors import DatabaseUnavailable, SchemaMissing
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import Store


def warm_up(store: Store, queue: str = "default") -> None:
    """Run publish, claim and finish until their SQL is sent directly and prepared
    (psycopg prepares a statement on its fifth run)."""
    for _ in range(6):
        store.enqueue([new_job(queue)])
        [job] = store.claim(queue, 1, "warm-up")
        assert store.finish(
            job.id, attempt=job.attempt, status=JobStatus.COMPLETED, log_status=LogStatus.SUCCESS
        )


def test_direct_statements_write_what_sqlalchemy_wrote(store: Store, db: Db) -> None:
    warm_up(store)
    job = new_job("default", priority=3, max_attempts=2, payload={"quote": "it's", "n": [1]})

    assert store.enqueue([job]) == 1
    [claimed] = store.claim("default", 1, "w1")
    assert (claimed.id, claimed.payload, claimed.priority) == (job.id, job.payload, 3)
    assert (claimed.attempt, claimed.max_attempts) == (1, 2)
    assert store.finish(
        job.id,
        attempt=1,
        status=JobStatus.COMPLETED,
        log_status=LogStatus.SUCCESS,
        result={"ok": True},
    )
    assert not store.finish(
        job.id, attempt=1, status=JobStatus.FAILED, log_status=LogStatus.FAILED
    ), "a finished success is never overwritten, on this path too"

    row = db.job(job.id)
    assert (row["status"], row["result"], row["lease_owner"]) == ("completed", {"ok": True}, None)
    assert [log["status"] for log in db.logs(job.id)] == ["success"]


def test_a_queue_dropped_behind_our_back_is_created_again(store: Store, db: Db) -> None:
    warm_up(store, "volatile")
    db.execute("DELETE FROM jobs WHERE queue_name = 'volatile'")
    db.execute("DELETE FROM job_queues WHERE name = 'volatile'")

    assert store.enqueue([new_job("volatile")]) == 1
    assert db.scalar("SELECT count(*) FROM job_queues WHERE name = 'volatile'") == 1


def test_terminated_sessions_raise_database_unavailable_once_then_reconnect(
    store: Store, db: Db
) -> None:
    warm_up(store)
    # Two pooled sessions, both killed: the failure that reveals one discards both.
    first, second = store.engine.connect(), store.engine.connect()
    first.close()
    second.close()
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND application_name = 'celery-pgqueue'"
    )

    with pytest.raises(DatabaseUnavailable):
        store.enqueue([new_job()])
    assert store.enqueue([new_job()]) == 1
    assert len(store.claim("default", 10, "w1")) == 1
    assert store.enqueue([new_job()]) == 1


def test_dropped_tables_name_the_migrate_command(store: Store, db: Db) -> None:
    warm_up(store)
    db.execute("DROP TABLE job_logs, jobs CASCADE")

    with pytest.raises(SchemaMissing, match="migrate"):
        store.enqueue([new_job()])
    with pytest.raises(SchemaMissing, match="migrate"):
        store.claim("default", 1, "w1")


def test_engine_listeners_see_every_statement_again(store: Store) -> None:
    warm_up(store)
    seen: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        store.enqueue([new_job()])
        store.claim("default", 1, "w1")
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)

    assert any("INSERT INTO jobs" in s for s in seen)
    assert any("FOR UPDATE SKIP LOCKED" in s for s in seen)


def deadlock_on_claim(db: Db, times: int) -> None:
    """Make the next ``times`` claims fail as PostgreSQL fails a deadlock's victim.

    A claim opens the attempt's job_logs row, so a trigger there raises SQLSTATE 40P01;
    a sequence (not rolled back with the statement) counts the claims it has failed.
    """
    db.execute("CREATE SEQUENCE claims_failed")
    db.execute(
        f"""
        CREATE FUNCTION fail_claim() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('claims_failed') <= {int(times)} THEN
                RAISE EXCEPTION 'deadlock detected (forced by the test)'
                    USING ERRCODE = 'deadlock_detected';
            END IF;
            RETURN NEW;
        END $$"""
    )
    db.execute(
        "CREATE TRIGGER fail_claim BEFORE INSERT ON job_logs "
        "FOR EACH ROW EXECUTE FUNCTION fail_claim()"
    )


@pytest.mark.parametrize("warm", [False, True], ids=["first-run", "direct"])
def test_a_claim_chosen_as_a_deadlock_victim_is_sent_again(
    store: Store, db: Db, warm: bool
) -> None:
    """Two workers' statements can deadlock under load; the server rolls one back. That
    claim changed nothing, so it is retried instead of raised (a worker whose claim
    raised stopped with "Unrecoverable error")."""
    if warm:
        warm_up(store)
    job = new_job("default")
    store.enqueue([job])
    deadlock_on_claim(db, times=2)

    [claimed] = store.claim("default", 1, "w1")

    assert claimed.id == job.id and claimed.attempt == 1
    assert db.scalar("SELECT last_value FROM claims_failed") == 3, "failed twice, then ran"
    assert [log["attempt_number"] for log in db.logs(job.id)] == [1]


def test_a_statement_that_keeps_deadlocking_still_raises(store: Store, db: Db) -> None:
    store.enqueue([new_job("default")])
    deadlock_on_claim(db, times=1000)

    with pytest.raises(sa.exc.OperationalError, match="deadlock"):
        store.claim("default", 1, "w1")
    assert db.scalar("SELECT status FROM jobs") == "queued", "nothing was claimed"
