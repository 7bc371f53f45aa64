"""Messages that are not Celery tasks stay queued until consumed (issue #14.8).

A Kombu application (``Producer``, ``SimpleQueue``, ``ConsumerMixin``) expects what
RabbitMQ and Redis give it: a message waits for its consumer however long that takes,
unless the message (``expiration``) or its queue (``x-message-ttl``, ``x-expires``,
``auto_delete``) says otherwise. Only Celery's own transient traffic (remote-control
mailboxes and replies, events) gets the transport's short ``message_ttl``, recognised
by Celery's exchanges and queues. Celery tasks sent with ``task_protocol=1`` carry
their name and id in the body, not the headers: they are tasks all the same.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from celery import Celery
from helpers import running_worker, wait_until
from kombu import Connection, Exchange, Queue

from celery_pgqueue.ids import job_id_for
from celery_pgqueue.store import Store

SHORT = 0.3  # seconds: message_ttl / x-message-ttl / expiration under test


def rows(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def ttl_of(database_url: str, queue: str) -> list[float | None]:
    """Seconds between each waiting message's creation and its expiry (None: never)."""
    found = rows(
        database_url,
        "SELECT extract(epoch FROM expires_at - created_at)::float8 FROM jobs"
        " WHERE queue_name = %s ORDER BY created_at",
        queue,
    )
    return [None if ttl is None else round(ttl, 1) for (ttl,) in found]


def wait_past(database_url: str, queue: str, seconds: float) -> None:
    """Until the database's clock is ``seconds`` past the newest message of ``queue``."""
    wait_until(
        lambda: rows(
            database_url,
            "SELECT now() > max(created_at) + make_interval(secs => %s) FROM jobs"
            " WHERE queue_name = %s",
            seconds,
            queue,
        )[0][0],
        timeout=10,
        message=f"{seconds} s past the last message of {queue}",
    )


def test_a_plain_message_waits_past_message_ttl_until_it_is_consumed(
    broker_url: str, database_url: str
) -> None:
    with Connection(broker_url, transport_options={"message_ttl": SHORT}) as conn:
        queue = Queue("orders", Exchange("orders", type="direct"), routing_key="orders")
        conn.Producer().publish(
            {"order": 1}, exchange=queue.exchange, routing_key="orders", declare=[queue]
        )
        simple = conn.SimpleQueue("plain-simple")
        simple.put({"order": 2})
        assert ttl_of(database_url, "orders") == [None]
        assert ttl_of(database_url, "plain-simple") == [None]

        wait_past(database_url, "plain-simple", 4 * SHORT)
        assert Store.for_url(broker_url).drop_expired_messages() == 0
        with conn.SimpleQueue(queue) as orders:
            first = orders.get(timeout=5)
            assert first.payload == {"order": 1}
            first.ack()
        second = simple.get(timeout=5)
        assert second.payload == {"order": 2}
        second.ack()
        simple.close()
    # Consumed and acked: gone, as from any broker's queue.
    assert rows(database_url, "SELECT count(*) FROM jobs") == [(0,)]


def test_a_message_expiration_is_honoured(broker_url: str, database_url: str) -> None:
    with Connection(broker_url) as conn:
        simple = conn.SimpleQueue("expiring")
        simple.put({"n": 1}, expiration=SHORT)
        assert ttl_of(database_url, "expiring") == [SHORT]
        wait_past(database_url, "expiring", SHORT)
        with pytest.raises(simple.Empty):
            simple.get(timeout=0.5)
        simple.close()


def test_a_queue_x_message_ttl_applies_to_publishers_in_other_processes(
    broker_url: str, database_url: str
) -> None:
    exchange = Exchange("short-lived", type="direct")
    queue = Queue("short", exchange, routing_key="short", message_ttl=SHORT)
    with Connection(broker_url) as consumer:
        queue(consumer.default_channel).declare()
        Store._registry.clear()  # the producer below shares nothing with this process
        with Connection(broker_url) as producer:
            # Publishes to the exchange only, never declaring the queue (as the
            # remote end of a request/reply does): the queue's TTL is in the database.
            producer.Producer().publish(
                {"n": 1}, exchange=exchange, routing_key="short", expiration=None
            )
            producer.Producer().publish(
                {"n": 2}, exchange=exchange, routing_key="short", expiration=10 * SHORT
            )
            producer.Producer().publish(
                {"n": 3}, exchange=exchange, routing_key="short", expiration=SHORT / 3
            )
        assert ttl_of(database_url, "short") == [SHORT, SHORT, round(SHORT / 3, 1)]
        wait_past(database_url, "short", SHORT)
        with consumer.SimpleQueue(queue) as simple, pytest.raises(simple.Empty):
            simple.get(timeout=0.5)


def test_celery_control_replies_and_events_keep_the_short_ttl(
    broker_url: str, database_url: str
) -> None:
    """Recognised by Celery's exchanges and queues, whatever their own arguments."""
    reply = Exchange("reply.celery.pidbox", type="direct")
    events = Exchange("celeryev", type="topic")
    with Connection(broker_url, transport_options={"message_ttl": 60.0}) as conn:
        channel = conn.default_channel
        Queue("abc.reply.celery.pidbox", reply, routing_key="abc")(channel).declare()
        Queue("celeryev.abc", events, routing_key="#")(channel).declare()
        producer = conn.Producer()
        producer.publish({"ok": 1}, exchange=reply, routing_key="abc")
        producer.publish({"type": "task-sent"}, exchange=events, routing_key="task.sent")
        producer.publish({"method": "ping"}, exchange="", routing_key="w1@host.celery.pidbox")
    assert ttl_of(database_url, "abc.reply.celery.pidbox") == [60.0]
    assert ttl_of(database_url, "celeryev.abc") == [60.0]
    assert ttl_of(database_url, "w1@host.celery.pidbox") == [60.0]


@pytest.mark.slow
@pytest.mark.worker
def test_protocol_1_tasks_are_tasks_durable_and_kept_as_history(
    make_app: Any, broker_url: str, database_url: str
) -> None:
    app: Celery = make_app(task_protocol=1, broker_transport_options={"message_ttl": SHORT})
    ran: list[tuple[int, int]] = []

    @app.task(name="t.add_v1", shared=False)
    def add(x: int, y: int) -> int:
        ran.append((x, y))
        return x + y

    task_id = str(uuid.uuid4())
    add.apply_async((2, 3), task_id=task_id)
    [(job_id, ttl)] = rows(database_url, "SELECT id, expires_at FROM jobs")
    assert (job_id, ttl) == (job_id_for(task_id), None)
    wait_past(database_url, "celery", 4 * SHORT)
    with running_worker(app):
        wait_until(
            lambda: rows(database_url, "SELECT status FROM jobs") == [("completed",)],
            timeout=20,
            message="the protocol 1 task completed and kept",
        )
    assert ran == [(2, 3)]
