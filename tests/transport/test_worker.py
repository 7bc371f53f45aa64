"""The transport under a real Celery worker (in a thread) and a real PostgreSQL."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
from celery.exceptions import Reject
from helpers import running_worker, wait_until
from kombu import Connection, Exchange, Queue

from celery_pgqueue.errors import InvalidQueueName, PayloadTooLarge
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.store import Store

from .conftest import Recorder

pytestmark = pytest.mark.worker


def rows(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def job(database_url: str, task_id: str) -> dict[str, Any]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cur = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id_for(task_id),))
        names = [c.name for c in cur.description or []]
        row = cur.fetchone()
        assert row is not None, f"no jobs row for {task_id}"
        return dict(zip(names, row, strict=True))


def test_publish_inserts_one_readable_row_and_creates_the_queue(make_app, database_url):
    app = make_app()

    @app.task(name="shop.confirm", shared=False)
    def confirm(order_id: int, notify: bool = True) -> None: ...

    result = confirm.delay(42, notify=False)

    row = job(database_url, result.id)
    assert row["status"] == "queued"
    assert row["queue_name"] == "celery"
    assert row["attempt_count"] == 0
    assert row["payload"]["headers"]["task"] == "shop.confirm"
    assert row["payload"]["body"][0] == [42]
    assert row["payload"]["body"][1] == {"notify": False}
    assert rows(database_url, "SELECT default_priority, is_active FROM job_queues") == [(100, True)]
    assert row["priority"] == 100, "no priority given: the queue's default_priority"


def test_priorities_run_lowest_number_first_and_zero_is_kept(make_app, database_url):
    app = make_app(worker_prefetch_multiplier=1)
    seen = Recorder()

    @app.task(name="t.mark", shared=False)
    def mark(label: str) -> None:
        seen.add(label)

    sent = [("p5", 5), ("p0", 0), ("none", None), ("p9", 9), ("p3", 3)]
    for label, priority in sent:
        options = {} if priority is None else {"priority": priority}
        mark.apply_async((label,), **options)
    stored = dict(rows(database_url, "SELECT payload->'body'->0->>0, priority FROM jobs"))
    assert stored == {"p5": 5, "p0": 0, "none": 100, "p9": 9, "p3": 3}

    with running_worker(app):
        wait_until(lambda: len(seen.snapshot()) == 5, timeout=20)
    assert seen.snapshot() == ["p0", "p3", "p5", "p9", "none"]


@pytest.mark.slow
def test_countdown_waits_in_the_database_and_runs_once_when_due(make_app, database_url, store):
    app = make_app()
    seen = Recorder()

    @app.task(name="t.stamp", shared=False)
    def stamp() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            seen.add(conn.execute("SELECT now()").fetchone()[0])  # type: ignore[index]

    with running_worker(app) as worker:
        result = stamp.apply_async(countdown=3)
        run_at = job(database_url, result.id)["run_at"]
        time.sleep(1)  # well inside the countdown
        # Nothing is held in worker memory while it waits: the row is still queued.
        assert worker.consumer.task_consumer.channel.qos.held() == []
        assert job(database_url, result.id)["status"] == "queued"
        wait_until(lambda: seen.snapshot(), timeout=15)
        wait_until(lambda: job(database_url, result.id)["status"] == "completed", timeout=10)
    assert len(seen.snapshot()) == 1
    assert seen.snapshot()[0] >= run_at, "ran before its run_at (database clock)"


def test_scheduled_tasks_are_not_held_in_worker_memory(make_app, database_url):
    app = make_app()

    @app.task(name="t.later", shared=False)
    def later() -> None: ...

    with running_worker(app) as worker:
        for _ in range(300):
            later.apply_async(countdown=3600)
        # Give the worker several polls to (wrongly) take them.
        sentinel = later.apply_async()
        wait_until(lambda: job(database_url, sentinel.id)["status"] == "completed", timeout=40)
        # The sentinel's own ack is flushed on the next tick; nothing else is ever held.
        qos = worker.consumer.task_consumer.channel.qos
        wait_until(lambda: qos.held() == [], timeout=10)
    counts = dict(rows(database_url, "SELECT status, count(*) FROM jobs GROUP BY status"))
    assert counts == {"queued": 300, "completed": 1}


def test_retry_updates_the_same_row_and_logs_every_attempt(make_app, database_url):
    app = make_app()

    @app.task(name="t.flaky", shared=False, bind=True, max_retries=5)
    def flaky(self: Any) -> str:
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return "ok"

    with running_worker(app):
        result = flaky.delay()
        wait_until(lambda: job(database_url, result.id)["status"] == "completed", timeout=20)
    assert rows(database_url, "SELECT count(*) FROM jobs") == [(1,)]
    row = job(database_url, result.id)
    assert row["attempt_count"] == 3
    assert row["max_attempts"] == 6
    logs = rows(
        database_url,
        "SELECT attempt_number, status FROM job_logs WHERE job_id = %s ORDER BY attempt_number",
        job_id_for(result.id),
    )
    assert logs == [(1, "retry"), (2, "retry"), (3, "success")]


def test_failure_marks_the_job_failed_with_a_short_message(make_app, database_url):
    app = make_app()

    @app.task(name="t.boom", shared=False)
    def boom() -> None:
        raise ValueError("x" * 400)

    with running_worker(app):
        result = boom.delay()
        wait_until(lambda: job(database_url, result.id)["status"] == "failed", timeout=15)
    row = job(database_url, result.id)
    assert row["last_error_message"].startswith("ValueError: xxx")
    assert len(row["last_error_message"]) == 255
    assert row["failed_at"] is not None


@pytest.mark.slow
def test_pause_stops_claims_durably_and_resume_wakes_workers(make_app, database_url, store):
    app = make_app(broker_transport_options={"polling_interval": 30, "maintenance_interval": 1})
    seen = Recorder()

    @app.task(name="t.p", shared=False)
    def p() -> None:
        seen.add(1)

    store.ensure_queues(["celery"])
    store.set_queue_active("celery", False)
    with running_worker(app):
        p.delay()
        with pytest.raises(AssertionError):
            wait_until(lambda: seen.snapshot(), timeout=1.5)
        assert rows(database_url, "SELECT status FROM jobs") == [("queued",)]
        store.set_queue_active("celery", True)
        # polling_interval is 30 s: only the resume's NOTIFY can wake the worker this fast.
        wait_until(lambda: seen.snapshot(), timeout=10)


@pytest.mark.slow
def test_notify_wakes_an_idle_worker_long_before_the_poll_interval(make_app, database_url):
    app = make_app(broker_transport_options={"polling_interval": 60, "maintenance_interval": 5})

    @app.task(name="t.quick", shared=False)
    def quick() -> None: ...

    with running_worker(app):
        time.sleep(0.3)  # let the worker go idle on its LISTEN socket
        result = quick.delay()
        wait_until(lambda: job(database_url, result.id)["status"] == "completed", timeout=10)


def test_polling_mode_without_notify_still_runs_tasks(make_app, database_url):
    app = make_app(broker_transport_options={"use_notify": False, "polling_interval": 0.2})

    @app.task(name="t.poll", shared=False)
    def poll() -> None: ...

    with running_worker(app):
        results = [poll.delay() for _ in range(5)]
        wait_until(
            lambda: all(job(database_url, r.id)["status"] == "completed" for r in results),
            timeout=15,
        )


def test_revoke_of_a_queued_task_is_durable_across_worker_restarts(make_app, database_url):
    app = make_app()
    seen = Recorder()

    @app.task(name="t.r", shared=False)
    def r(label: str) -> None:
        seen.add(label)

    doomed = r.delay("doomed")
    app.control.revoke(doomed.id)
    assert job(database_url, doomed.id)["status"] == "cancelled"

    with running_worker(app):
        after = r.delay("after")
        wait_until(lambda: job(database_url, after.id)["status"] == "completed", timeout=15)
    with running_worker(app):  # a fresh worker has no in-memory revoke list
        again = r.delay("again")
        wait_until(lambda: job(database_url, again.id)["status"] == "completed", timeout=15)
    assert "doomed" not in seen.snapshot()
    assert job(database_url, doomed.id)["status"] == "cancelled"


def test_oversized_payload_is_refused_at_delay_and_leaves_no_row(make_app, database_url):
    app = make_app(broker_transport_options={"max_payload_bytes": 1024})

    @app.task(name="t.big", shared=False)
    def big(blob: str) -> None: ...

    with pytest.raises(PayloadTooLarge) as caught:
        big.delay("x" * 5000)
    text = str(caught.value)
    assert "1,024-byte limit" in text and "max_payload_bytes" in text and "t.big" in text
    assert rows(database_url, "SELECT count(*) FROM jobs") == [(0,)]


def test_queue_name_over_100_characters_is_refused(make_app, database_url):
    app = make_app()

    @app.task(name="t.q", shared=False)
    def q() -> None: ...

    with pytest.raises(InvalidQueueName, match="1 to 100 characters"):
        q.apply_async(queue="q" * 101)
    odd = "it's; DROP TABLE jobs; -- ✓"
    q.apply_async(queue=odd)
    assert rows(database_url, "SELECT queue_name FROM jobs") == [(odd,)]


def test_non_task_messages_work_and_leave_no_rows(broker_url, database_url):
    with Connection(broker_url) as conn:
        queue = conn.SimpleQueue("plain")
        queue.put({"hello": "world"})
        message = queue.get(timeout=5)
        assert message.payload == {"hello": "world"}
        message.ack()
        queue.close()
    assert rows(database_url, "SELECT count(*) FROM jobs") == [(0,)]


def test_fanout_reaches_every_bound_queue_from_another_process_view(broker_url, database_url):
    exchange = Exchange("bcast", type="fanout")
    queues = [Queue(f"listener-{n}", exchange) for n in range(2)]
    received: dict[str, list[Any]] = {q.name: [] for q in queues}
    with Connection(broker_url) as consumer_conn:
        channel = consumer_conn.channel()
        for q in queues:
            q(channel).declare()
        # A separate connection stands for a producer elsewhere: it routes by the
        # bindings stored in the database, not by anything in this process's memory.
        Store._registry.clear()
        with Connection(broker_url) as producer_conn:
            producer_conn.Producer().publish({"n": 1}, exchange=exchange, declare=[exchange])
        for q in queues:
            simple = consumer_conn.SimpleQueue(q)
            message = simple.get(timeout=5)
            received[q.name].append(message.payload)
            message.ack()
    assert received == {"listener-0": [{"n": 1}], "listener-1": [{"n": 1}]}


def test_reject_with_requeue_comes_back_marked_redelivered(make_app, database_url):
    app = make_app(task_acks_late=True)
    seen = Recorder()

    @app.task(name="t.once_rejected", shared=False, bind=True)
    def once_rejected(self: Any) -> None:
        seen.add(self.request.delivery_info.get("redelivered"))
        if len(seen.snapshot()) == 1:
            raise Reject("not now", requeue=True)

    with running_worker(app):
        result = once_rejected.delay()
        wait_until(lambda: job(database_url, result.id)["status"] == "completed", timeout=20)
    assert seen.snapshot() == [False, True]
    assert rows(database_url, "SELECT count(*) FROM jobs") == [(1,)]
    assert job(database_url, result.id)["attempt_count"] == 2


def test_tasks_with_custom_ids_map_to_stable_rows(make_app, database_url):
    app = make_app()

    @app.task(name="t.custom", shared=False)
    def custom() -> None: ...

    with running_worker(app):
        custom.apply_async(task_id="order-42")
        wait_until(lambda: job(database_url, "order-42")["status"] == "completed", timeout=15)
    assert job(database_url, "order-42")["id"] == uuid.uuid5(
        uuid.UUID("5b0f3c9e-6a53-4c1e-9d7e-9a1c6f3d2b10"), "order-42"
    )


def test_revoking_a_queued_task_wakes_a_client_waiting_on_its_result(make_app, broker_url):
    import threading

    from celery.exceptions import TaskRevokedError

    app = make_app(
        result_backend=broker_url,
        result_backend_transport_options={"polling_interval": 60},
    )

    @app.task(name="t.never", shared=False)
    def never() -> None: ...

    result = never.delay()
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            result.get(timeout=50)
        except BaseException as exc:  # the test inspects whatever get() raised
            outcome.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(0.5)  # the client is now waiting on its LISTEN connection
    app.control.revoke(result.id)
    # Far sooner than the 60 s poll or the backend's periodic re-read: NOTIFY woke it.
    wait_until(lambda: outcome, timeout=8)
    assert isinstance(outcome[0], TaskRevokedError)


def test_workers_prune_finished_jobs_by_themselves(make_app, database_url):
    app = make_app(
        broker_transport_options={
            "polling_interval": 0.5,
            "maintenance_interval": 0.3,
            "completed_retention": 1.0,
        }
    )

    @app.task(name="t.short_lived", shared=False)
    def short_lived() -> None: ...

    with running_worker(app):
        result = short_lived.delay()
        wait_until(lambda: job(database_url, result.id)["status"] == "completed", timeout=15)
        # No beat, no CLI: the worker's own maintenance step deletes it and its logs.
        wait_until(lambda: rows(database_url, "SELECT count(*) FROM jobs") == [(0,)], timeout=15)
    assert rows(database_url, "SELECT count(*) FROM job_logs") == [(0,)]
