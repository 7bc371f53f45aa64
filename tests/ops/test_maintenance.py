"""maintenance.run_once: rescue, retention, expiry, and one process at a time."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_pgqueue.maintenance import run_once
from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import NewJob, PruneCounts, Store

from .conftest import Jobs

DAY = 86_400.0


def age(sql: Callable[..., Any], job_id: uuid.UUID, interval: str) -> None:
    sql("UPDATE jobs SET updated_at = now() - %s::interval WHERE id = %s", interval, job_id)


def exists(store: Store, job_id: uuid.UUID) -> bool:
    return store.job(job_id) is not None


def advisory_locks(sql: Callable[..., Any]) -> list[tuple[Any, ...]]:
    """The state of each session holding an advisory lock in this database."""
    return sql(
        "SELECT a.state FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND a.datname = current_database()"
    )


def test_a_pass_with_nothing_to_do_reports_zeros(store: Store) -> None:
    report = run_once(store, completed_retention=DAY)
    assert report.ran and report.finished
    assert (report.rescued, report.rescued_failed, report.expired_messages) == (0, 0, 0)
    assert report.expired_queues == 0
    assert report.pruned == PruneCounts()


def test_rescue_requeues_a_job_whose_lease_lapsed(store: Store, jobs: Jobs, sql: Any) -> None:
    lost = jobs.running()
    live = jobs.running()
    sql("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", lost)
    report = run_once(store, completed_retention=DAY)
    assert (report.rescued, report.rescued_failed) == (1, 0)
    assert store.job(lost).status == JobStatus.QUEUED  # type: ignore[union-attr]
    assert store.job(live).status == JobStatus.RUNNING  # type: ignore[union-attr]
    assert [a.status for a in store.attempts(lost)] == [LogStatus.RETRY]
    again = store.claim("default", 10, owner="other")
    assert [(c.id, c.attempt) for c in again] == [(lost, 2)]


def test_rescue_fails_a_lost_job_that_was_acked_early(store: Store, jobs: Jobs, sql: Any) -> None:
    lost = jobs.running()
    store.mark_acked([(lost, 1)])
    sql("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", lost)
    report = run_once(store, completed_retention=DAY)
    assert (report.rescued, report.rescued_failed) == (0, 1)
    assert store.job(lost).status == JobStatus.FAILED  # type: ignore[union-attr]


def test_retention_deletes_exactly_what_is_past_each_retention(
    store: Store, jobs: Jobs, sql: Any
) -> None:
    cases = {
        "completed_2h": (jobs.completed(), "2 hours", False),
        "completed_30m": (jobs.completed(), "30 minutes", True),
        "cancelled_2h": (jobs.cancelled(), "2 hours", False),
        "failed_2h": (jobs.failed(), "2 hours", True),  # failed_retention is 7 days
        "failed_8d": (jobs.failed(), "8 days", False),
        "queued_8d": (jobs.queued(), "8 days", True),  # waiting work is never pruned
        "running_8d": (jobs.running(), "8 days", True),
    }
    for job_id, interval, _ in cases.values():
        age(sql, job_id, interval)
    report = run_once(store, completed_retention=3600)
    assert report.pruned == PruneCounts(completed=1, cancelled=1, failed=1, logs=0)
    for name, (job_id, _, kept) in cases.items():
        assert exists(store, job_id) == kept, name


def test_retention_prunes_old_log_rows_and_caps_them_per_job(database_url: str, sql: Any) -> None:
    store = Store(database_url, PgQueueOptions(max_logs_per_job=2))
    try:
        jobs = Jobs(store)
        capped = jobs.failed(attempts=4)
        old_logs = jobs.failed(attempts=1)
        sql(
            "UPDATE job_logs SET started_at = now() - interval '8 days', "
            "finished_at = now() - interval '8 days' WHERE job_id = %s",
            old_logs,
        )
        report = run_once(store, completed_retention=DAY)
        assert report.pruned == PruneCounts(logs=3)
        assert [a.attempt_number for a in store.attempts(capped)] == [3, 4]
        assert store.attempts(old_logs) == []
        assert exists(store, old_logs), "the job outlives its old log rows"
    finally:
        store.dispose()


def test_retention_works_through_a_backlog_in_batches(database_url: str, sql: Any) -> None:
    store = Store(database_url, PgQueueOptions(prune_batch_size=7))
    try:
        store.ensure_queues(["default"])
        sql(
            "INSERT INTO jobs (id, queue_name, status, priority, completed_at, updated_at) "
            "SELECT gen_random_uuid(), 'default', 'completed', 100, now(), "
            "now() - interval '2 days' FROM generate_series(1, 50)"
        )
        report = run_once(store, completed_retention=DAY)
        assert report.pruned.completed == 50 and report.finished
        assert sql("SELECT count(*) FROM jobs")[0][0] == 0
    finally:
        store.dispose()


def test_a_time_budget_stops_the_pass_and_the_next_one_carries_on(
    database_url: str, sql: Any
) -> None:
    store = Store(database_url, PgQueueOptions(prune_batch_size=5))
    try:
        store.ensure_queues(["default"])
        sql(
            "INSERT INTO jobs (id, queue_name, status, priority, completed_at, updated_at) "
            "SELECT gen_random_uuid(), 'default', 'completed', 100, now(), "
            "now() - interval '2 days' FROM generate_series(1, 20)"
        )
        first = run_once(store, completed_retention=DAY, time_budget=0.0)
        assert first.ran and not first.finished
        assert first.pruned.completed == 0
        second = run_once(store, completed_retention=DAY)
        assert second.finished and second.pruned.completed == 20
    finally:
        store.dispose()


def transient(store: Store, queue: str, **kw: Any) -> uuid.UUID:
    """A message that is not a Celery task (a remote-control reply, an event)."""
    job_id = uuid.uuid4()
    payload = {"headers": {}, "body": {"ok": "pong"}, "properties": {}}
    store.enqueue([NewJob(id=job_id, queue_name=queue, payload=payload, **kw)])
    return job_id


def test_expired_messages_are_dropped_and_live_ones_kept(store: Store, sql: Any) -> None:
    expired = transient(store, "replies", ttl_seconds=60)
    live = transient(store, "replies", ttl_seconds=60)
    forever = transient(store, "replies")
    sql("UPDATE jobs SET expires_at = now() - interval '1 second' WHERE id = %s", expired)
    report = run_once(store, completed_retention=DAY)
    assert report.expired_messages == 1
    assert not exists(store, expired)
    assert exists(store, live) and exists(store, forever)


def test_an_expired_task_is_cancelled_with_a_log_row_and_kept(
    store: Store, jobs: Jobs, sql: Any
) -> None:
    """Celery's ``expires``: the task ends REVOKED, so its row must say so, not vanish."""
    expired = jobs.queued(ttl_seconds=60)
    live = jobs.queued(ttl_seconds=60)
    sql("UPDATE jobs SET expires_at = now() - interval '1 second' WHERE id = %s", expired)
    report = run_once(store, completed_retention=DAY)
    assert report.expired_tasks == 1 and report.expired_messages == 0
    row = store.job(expired)
    assert row is not None, "an expired task keeps its row under the normal retention"
    assert row.status == JobStatus.CANCELLED
    [log] = store.attempts(expired)
    assert log.status == LogStatus.FAILED and "expired" in (log.log_message or "")
    assert store.job(live).status == JobStatus.QUEUED  # type: ignore[union-attr]
    # Retention treats it like any cancelled job: kept for completed_retention.
    assert run_once(store, completed_retention=DAY).pruned.cancelled == 0
    age(sql, expired, "2 days")
    assert run_once(store, completed_retention=DAY).pruned.cancelled == 1


def test_an_expired_queue_goes_with_its_waiting_messages_and_bindings(
    store: Store, jobs: Jobs, sql: Any
) -> None:
    waiting = jobs.queued("celeryev.abc")
    jobs.queued("busy.pidbox")
    running = jobs.running("busy.pidbox")
    jobs.queued("kept")
    store.bind("celeryev", "topic", "#", "celeryev.abc")
    sql(
        "UPDATE job_queues SET expires_at = now() - interval '1 second' "
        "WHERE name IN ('celeryev.abc', 'busy.pidbox')"
    )
    report = run_once(store, completed_retention=DAY)
    assert report.expired_queues == 1
    assert report.expired_messages == 2  # one in each expired queue
    assert not exists(store, waiting)
    assert not store.queue_exists("celeryev.abc")
    assert store.binding_table("celeryev") == []
    # A queue with a running job stays until the job is gone.
    assert store.queue_exists("busy.pidbox") and exists(store, running)
    assert store.queue_exists("kept")


@pytest.fixture
def second_store(database_url: str) -> Iterator[Store]:
    store = Store(database_url, PgQueueOptions())
    yield store
    store.dispose()


def test_while_one_process_holds_the_lock_another_pass_does_nothing(
    store: Store, second_store: Store, jobs: Jobs, sql: Any
) -> None:
    old = jobs.completed()
    age(sql, old, "2 days")
    with second_store.advisory_lock("maintenance") as held:
        assert held
        blocked = run_once(store, completed_retention=DAY)
    assert blocked.ran is False
    assert exists(store, old)
    after = run_once(store, completed_retention=DAY)
    assert after.ran and after.pruned.completed == 1


def test_two_concurrent_passes_only_one_does_the_work(
    store: Store, second_store: Store, jobs: Jobs, sql: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = jobs.running()
    sql("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", lost)
    old = jobs.completed()
    age(sql, old, "2 days")
    inside, release = threading.Event(), threading.Event()
    real_rescue = store.rescue_expired

    def rescue_then_wait(limit: int = 1000, **kw: Any) -> tuple[int, int]:
        # Hold the first pass inside its lock (the real statement still runs).
        inside.set()
        assert release.wait(10)
        return real_rescue(limit, **kw)

    monkeypatch.setattr(store, "rescue_expired", rescue_then_wait)
    reports: dict[str, Any] = {}
    leader = threading.Thread(
        target=lambda: reports.__setitem__("a", run_once(store, completed_retention=DAY))
    )
    leader.start()
    assert inside.wait(10)
    reports["b"] = run_once(second_store, completed_retention=DAY)
    # The leader's lock belongs to an open transaction (so PgBouncer in transaction
    # pooling keeps it on one server connection), not to a session.
    assert advisory_locks(sql) == [("idle in transaction",)]
    release.set()
    leader.join(10)
    assert reports["b"].ran is False
    assert reports["a"].ran is True
    assert reports["a"].rescued == 1 and reports["a"].pruned.completed == 1
    assert advisory_locks(sql) == []


def test_the_lock_is_released_when_a_pass_fails(
    store: Store, second_store: Store, sql: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(limit: int = 1000, **_: Any) -> tuple[int, int]:
        raise RuntimeError("boom")

    monkeypatch.setattr(store, "rescue_expired", broken)
    with pytest.raises(RuntimeError):
        run_once(store, completed_retention=DAY)
    assert advisory_locks(sql) == []
    assert run_once(second_store, completed_retention=DAY).ran


def test_locks_are_per_schema(database_url: str, sql: Any) -> None:
    from celery_pgqueue.migrate import upgrade

    upgrade(database_url, schema="other")
    public = Store(database_url, PgQueueOptions())
    other = Store(database_url, PgQueueOptions(schema="other"))
    try:
        with public.advisory_lock("maintenance") as held:
            assert held
            assert run_once(other, completed_retention=DAY).ran
    finally:
        public.dispose()
        other.dispose()


def test_enqueue_into_a_queue_dropped_by_expiry_is_not_confused_by_the_cache(
    store: Store, sql: Any
) -> None:
    job = NewJob(id=uuid.uuid4(), queue_name="reply.x", payload={})
    store.enqueue([job])
    store.claim("reply.x", 1, owner="w")
    store.finish(job.id, attempt=1, status=JobStatus.COMPLETED, log_status=LogStatus.SUCCESS)
    store.delete([job.id])
    sql("UPDATE job_queues SET expires_at = now() - interval '1 second' WHERE name = 'reply.x'")
    assert run_once(store, completed_retention=DAY).expired_queues == 1
    # This process dropped it, so it forgets it and re-creates the queue on next use.
    store.enqueue([NewJob(id=uuid.uuid4(), queue_name="reply.x", payload={})])
    assert store.queue_exists("reply.x")
