"""The lease keeper in one process: what it renews, and what it never drops silently.

Process-level cases (an exhausted pool, ``kill -9``, long tasks) are in
tests/transport_process/test_process_leases.py; synchronous consumers in
test_sync_consumers.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from helpers import with_database
from kombu import Connection, Exchange, Queue

from celery_pgqueue import leases
from celery_pgqueue.leases import LeaseKeeper
from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.store import Store
from celery_pgqueue.transport import run_maintenance

LEASE = 30.0  # long: nothing lapses unless the test says so
OPTIONS = {"lease_seconds": LEASE, "maintenance_interval": 60.0, "polling_interval": 0.2}


def sql(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def connection(broker_url: str) -> Iterator[Connection]:
    conn = Connection(broker_url, transport_options=OPTIONS)
    yield conn
    conn.release()


def _held_message(connection: Connection, broker_url: str, name: str) -> Any:
    """A plain Kombu message taken with ``basic_get`` and not acked: a running row."""
    exchange = Exchange(f"{name}-ex", type="direct")
    queue = Queue(name, exchange, routing_key=name)
    simple = connection.SimpleQueue(queue)
    with Connection(broker_url, transport_options=OPTIONS) as producer:
        producer.Producer(serializer="json").publish(
            {"n": name}, exchange=exchange, routing_key=name, declare=[queue]
        )
    return simple.get_nowait()


def _lapse(database_url: str, job_id: str) -> None:
    """As if renewal had not run for longer than the lease (a process stalled in C)."""
    sql(
        database_url,
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        uuid.UUID(job_id),
    )


def _row(database_url: str, job_id: str) -> tuple[Any, ...]:
    [row] = sql(
        database_url,
        "SELECT status, lease_owner, lease_expires_at > now() FROM jobs WHERE id = %s",
        uuid.UUID(job_id),
    )
    return row


def test_this_process_renews_its_own_leases_before_its_maintenance_rescues(
    connection: Connection, broker_url: str, database_url: str
) -> None:
    """After a stall every thread wakes at once; maintenance must not go first.

    Two messages held unacked, their leases lapsed while the keeper's thread could not
    run. A pass without the keeper (as another process would run it) takes one back;
    this process's own pass renews first and keeps the other.
    """
    other = _held_message(connection, broker_url, "stalled-a")
    mine = _held_message(connection, broker_url, "stalled-b")
    store = connection.default_channel.store
    keeper = LeaseKeeper.for_store(store)
    keeper.stop()  # the stalled thread: no renewal runs by itself from here on
    _lapse(database_url, other.properties["pgqueue_job"])

    run_maintenance(Store(broker_url, PgQueueOptions.parse(OPTIONS)))
    assert _row(database_url, other.properties["pgqueue_job"])[0] == "queued", (
        "a lapsed lease is rescued by a process that does not hold it"
    )
    _lapse(database_url, mine.properties["pgqueue_job"])
    run_maintenance(store, keeper=keeper)
    assert _row(database_url, mine.properties["pgqueue_job"]) == (
        "running",
        leases.process_owner(),
        True,
    ), "renewed by its holder before rescue"
    mine.ack()


def test_its_own_maintenance_spares_what_this_process_holds_when_rescue_runs_late(
    connection: Connection, broker_url: str, database_url: str
) -> None:
    """Renewed just now, yet lapsed by the time the rescue statement runs (a starved
    process, a slow pool): this process's pass leaves it; another process's takes it."""
    message = _held_message(connection, broker_url, "spared")
    job_id = message.properties["pgqueue_job"]
    store = connection.default_channel.store
    keeper = LeaseKeeper.for_store(store)
    keeper.stop()
    keeper.renew()  # not due again for a third of the lease
    _lapse(database_url, job_id)

    run_maintenance(store, keeper=keeper)
    assert _row(database_url, job_id) == ("running", leases.process_owner(), False), (
        "spared, not renewed: its own pass does not take it back"
    )
    run_maintenance(Store(broker_url, PgQueueOptions.parse(OPTIONS)))
    assert _row(database_url, job_id)[0] == "queued", "another process's pass does"


class _Flaky:
    """A consumer whose held deliveries can be read once, then its reads fail."""

    def __init__(self, held: list[uuid.UUID]) -> None:
        self.held = held
        self.reads = 0

    def held_jobs(self) -> list[uuid.UUID]:
        self.reads += 1
        if self.reads > 1:
            raise RuntimeError("dictionary changed size during iteration")
        return self.held

    def expiring_queues(self) -> list[tuple[str, float]]:
        return []


def test_jobs_a_consumer_cannot_list_are_renewed_as_last_read_and_named_in_a_warning(
    connection: Connection, broker_url: str, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    message = _held_message(connection, broker_url, "flaky")
    job_id = uuid.UUID(message.properties["pgqueue_job"])
    store = connection.default_channel.store
    keeper = LeaseKeeper.for_store(store)
    keeper.stop()
    source = _Flaky([job_id])
    keeper.attach(source)
    keeper.stop()
    keeper.renew()  # read once
    _lapse(database_url, str(job_id))

    with caplog.at_level(logging.WARNING, logger="celery_pgqueue"):
        keeper.renew()  # and now the read fails

    assert source.reads == 2
    assert str(job_id) in caplog.text, "the warning names the job it carried over"
    assert _row(database_url, str(job_id))[2] is True, "and its lease was renewed anyway"
    keeper.detach(source)
    message.ack()


def test_acks_that_cannot_be_written_at_close_are_named_in_a_warning(
    broker_url: str, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    connection = Connection(broker_url, transport_options=OPTIONS)
    message = _held_message(connection, broker_url, "closing")
    message.ack()  # deferred: written by the next claim, the next beat, or at close
    name = sql(database_url, "SELECT current_database()")[0][0]
    admin = with_database(database_url, "postgres")
    # The database goes away for this process: no session, no new one.
    sql(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        sql(
            admin,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            name,
        )
        with caplog.at_level(logging.WARNING, logger="celery_pgqueue"):
            connection.release()
    finally:
        sql(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert message.properties["pgqueue_job"] in caplog.text, caplog.text


def test_a_broken_maintenance_module_stops_the_transport_from_loading() -> None:
    """Retention must not stop silently: no fallback that only rescues."""
    code = (
        "import sys; sys.modules['celery_pgqueue.maintenance'] = None\n"
        "try:\n"
        "    import celery_pgqueue.transport\n"
        "except ImportError as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    print('loaded')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.startswith("refused:"), done.stdout + done.stderr
