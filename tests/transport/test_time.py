"""Time under a real worker: what a countdown task sees, and when an idle worker wakes.

The row waits in the database until ``run_at``; the worker must then start it at
once (not on its next poll) and the task must see the ``eta`` its caller sent, as on
Redis. Polling intervals here are long (30 s) so that a start on the poll instead of
the wake-up would be obvious without a tight timing bound.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from helpers import running_worker, wait_until
from kombu import Connection

from celery_pgqueue.ids import job_id_for

from .conftest import Recorder

pytestmark = pytest.mark.worker

LONG_POLL = {"polling_interval": 30.0, "maintenance_interval": 5.0}


def job(database_url: str, task_id: str) -> dict[str, Any]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cur = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id_for(task_id),))
        names = [c.name for c in cur.description or []]
        row = cur.fetchone()
        assert row is not None, f"no jobs row for {task_id}"
        return dict(zip(names, row, strict=True))


def test_a_countdown_task_sees_the_eta_its_caller_sent(make_app, database_url):
    app = make_app()
    seen = Recorder()

    @app.task(name="t.when", bind=True, shared=False)
    def when(self: Any) -> None:
        seen.add(self.request.eta)

    with running_worker(app):
        result = when.apply_async(countdown=1)
        sent = job(database_url, result.id)["payload"]["headers"]["eta"]
        wait_until(seen.snapshot, timeout=20)
    assert sent, "Celery put the countdown into the message as an ISO eta"
    assert seen.snapshot() == [sent], "the task sees the eta that was sent, as on Redis"


@pytest.mark.slow
def test_an_idle_worker_wakes_for_a_countdown_task_not_on_its_next_poll(make_app, database_url):
    app = make_app(broker_transport_options=LONG_POLL)
    seen = Recorder()

    @app.task(name="t.due", shared=False)
    def due(label: str) -> None:
        seen.add(label)

    with running_worker(app):
        time.sleep(0.5)  # idle on its LISTEN socket, the next poll 30 s away
        due.apply_async(("soon",), countdown=2)
        # The 30 s poll would be far too late: the worker woke for run_at itself.
        wait_until(lambda: seen.snapshot() == ["soon"], timeout=20)


@pytest.mark.slow
def test_a_shorter_countdown_published_later_moves_the_wake_up_earlier(make_app, database_url):
    app = make_app(broker_transport_options=LONG_POLL)
    seen = Recorder()

    @app.task(name="t.due", shared=False)
    def due(label: str) -> None:
        seen.add(label)

    with running_worker(app):
        time.sleep(0.5)
        due.apply_async(("late",), countdown=25)  # the worker now waits for this one
        time.sleep(0.5)
        due.apply_async(("early",), countdown=2)
        wait_until(lambda: seen.snapshot() == ["early"], timeout=20)


@pytest.mark.slow
def test_a_worker_wakes_for_countdown_tasks_published_before_it_started(make_app, database_url):
    app = make_app(broker_transport_options=LONG_POLL)
    seen = Recorder()

    @app.task(name="t.due", shared=False)
    def due(label: str) -> None:
        seen.add(label)

    due.apply_async(("before",), countdown=3)
    with running_worker(app):
        wait_until(lambda: seen.snapshot() == ["before"], timeout=20)


@pytest.mark.slow
def test_a_synchronous_consumer_wakes_for_a_countdown_task(make_app, broker_url, database_url):
    """``drain_events`` without an event loop sleeps until run_at, not the poll interval.

    A due task published 12 s in would wake it too (NOTIFY): the countdown task must
    arrive alone, before that one was even sent.
    """
    app = make_app(broker_transport_options=LONG_POLL)

    @app.task(name="t.due", shared=False)
    def due() -> None: ...

    scheduled = due.apply_async(countdown=2)
    sentinel_sent = threading.Event()

    def send_sentinel() -> None:
        due.delay()
        sentinel_sent.set()

    timer = threading.Timer(12.0, send_sentinel)
    received: list[Any] = []
    with Connection(broker_url, transport_options=LONG_POLL) as conn:
        queue = app.amqp.queues["celery"]
        with conn.Consumer(queue, callbacks=[lambda body, message: received.append(message)]):
            timer.start()
            try:
                conn.drain_events(timeout=25)
                woke_alone = not sentinel_sent.is_set()
            finally:
                timer.cancel()
                timer.join()
        assert [m.headers["id"] for m in received][:1] == [scheduled.id]
        assert woke_alone, "the consumer slept until another publish woke it"
        for message in received:
            message.ack()
