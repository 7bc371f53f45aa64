"""Consumers without an event loop stay alive: Kombu's ``ConsumerMixin`` and ``SimpleQueue``.

Flower, ``celery events`` and plain Kombu applications call ``drain_events()`` in a
loop; nothing registers them with an event loop. Their queues' ``x-expires``, their
bindings and the leases of the messages they hold unacked must still be renewed for
as long as they consume: another process's maintenance (here the test's own, as any
worker's would) drops an expired queue with its bindings and rescues a lapsed lease.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import wait_until
from kombu import Connection, Exchange, Queue
from kombu.mixins import ConsumerMixin

from celery_pgqueue import maintenance
from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.store import Store

pytestmark = pytest.mark.slow

EXPIRES = 2.0  # the queue's x-expires, seconds
X_EXPIRES = {"x-expires": int(EXPIRES * 1000)}
LEASE = 1.5
# Well past both: the queue would have expired and the lease lapsed several times over.
OUTLIVE = 4 * EXPIRES
OPTIONS = {"lease_seconds": LEASE, "polling_interval": 0.2, "maintenance_interval": 0.3}


@pytest.fixture
def other_maintenance(broker_url: str) -> Iterator[None]:
    """Maintenance passes from a pool of its own, as another worker's would run them."""
    store = Store(broker_url, PgQueueOptions.parse(OPTIONS))
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.2):
            maintenance.run_once(store, completed_retention=86_400.0)

    thread = threading.Thread(target=loop, name="other-maintenance", daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)
    store.dispose()


class Collector(ConsumerMixin):  # type: ignore[misc]
    """Acks what arrives on its expiring queue; holds the first message of the other
    unacked (a long piece of work) and counts any second delivery of it."""

    def __init__(self, connection: Connection, queues: list[Queue]) -> None:
        self.connection = connection
        self.queues = queues
        self.bodies: list[Any] = []
        self.held: Any = None
        self.redelivered = 0

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        return [consumer_cls(queues=self.queues, callbacks=[self.on_message], accept=["json"])]

    def on_message(self, body: Any, message: Any) -> None:
        self.bodies.append(body)
        if body == "held":
            if self.held is None:
                self.held = message
                return
            self.redelivered += 1
        message.ack()


def _publisher(broker_url: str, exchange: Exchange) -> Callable[..., None]:
    def publish(body: str, routing_key: str = "short") -> None:
        with Connection(broker_url, transport_options=OPTIONS) as conn:
            conn.Producer(serializer="json").publish(
                body, exchange=exchange, routing_key=routing_key, retry=True
            )

    return publish


def test_a_consumer_mixin_keeps_its_expiring_queue_and_its_unacked_message(
    broker_url: str, other_maintenance: None
) -> None:
    exchange = Exchange("sync-ex", type="direct")
    short = Queue("short-lived", exchange, routing_key="short", queue_arguments=X_EXPIRES)
    work = Queue("work", exchange, routing_key="work")
    publish = _publisher(broker_url, exchange)
    connection = Connection(broker_url, transport_options=OPTIONS)
    collector = Collector(connection, [short, work])
    thread = threading.Thread(target=collector.run, name="consumer-mixin", daemon=True)
    thread.start()
    try:
        # Declared and bound once the consumer is up: publish until one arrives.
        wait_until(
            lambda: publish("hello") or "hello" in collector.bodies, timeout=10, interval=0.5
        )
        publish("held", routing_key="work")
        wait_until(lambda: collector.held is not None, timeout=10)
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < OUTLIVE:
            n += 1
            publish(f"tick {n}")
            time.sleep(0.5)
        publish("last")
        wait_until(
            lambda: "last" in collector.bodies,
            timeout=10,
            message="a message published long after x-expires still arrives",
        )
        assert collector.redelivered == 0, "the unacked message's lease was kept"
        collector.held.ack()
    finally:
        collector.should_stop = True
        thread.join(10)
        connection.release()


def test_a_simple_queue_get_loop_keeps_its_expiring_queue(
    broker_url: str, other_maintenance: None
) -> None:
    exchange = Exchange("simple-ex", type="direct")
    queue = Queue("simple-short", exchange, routing_key="short", queue_arguments=X_EXPIRES)
    publish = _publisher(broker_url, exchange)
    received: list[Any] = []
    stop = threading.Event()

    def loop() -> None:
        with Connection(broker_url, transport_options=OPTIONS) as conn:
            simple = conn.SimpleQueue(queue)
            while not stop.is_set():
                try:
                    message = simple.get(block=True, timeout=0.5)
                except simple.Empty:
                    continue
                received.append(message.payload)
                message.ack()
            simple.close()

    thread = threading.Thread(target=loop, name="simple-queue", daemon=True)
    thread.start()
    try:
        wait_until(lambda: publish("first") or "first" in received, timeout=10, interval=0.5)
        started = time.monotonic()
        while time.monotonic() - started < OUTLIVE:
            publish("tick")
            time.sleep(0.5)
        publish("last")
        wait_until(
            lambda: "last" in received,
            timeout=10,
            message="a message published long after x-expires still arrives",
        )
    finally:
        stop.set()
        thread.join(10)
