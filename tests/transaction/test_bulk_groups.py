"""Groups and chunks through pgqueue are inserted in one statement, all-or-nothing."""

from __future__ import annotations

from typing import Any

import pytest
from celery import group
from helpers import running_worker, wait_until
from kombu import Producer
from tx_support import statuses

from celery_pgqueue.errors import PayloadTooLarge

pytestmark = pytest.mark.worker


@pytest.mark.slow
def test_a_group_outside_any_transaction_is_one_insert_and_a_worker_runs_it_all(
    app: Any, database_url: str, job_inserts: Any
) -> None:

    done: list[int] = []

    @app.task(name="bulk.n", shared=False)
    def n(i: int) -> None:
        done.append(i)

    app.connection_for_write().ensure_connection()
    group(n.s(i) for i in range(2500)).apply_async()
    # Kombu's batch size is 1,000 rows per statement: 2,500 tasks are three INSERTs.
    assert job_inserts.count == 3
    assert len(statuses(database_url)) == 2500

    with running_worker(app):
        wait_until(lambda: len(done) == 2500, timeout=60, message="all run")

    assert sorted(done) == list(range(2500))


def test_chunks_are_published_as_one_insert(app: Any, database_url: str, job_inserts: Any) -> None:
    @app.task(name="bulk.add", shared=False)
    def add(a: int, b: int) -> int:
        return a + b

    app.connection_for_write().ensure_connection()
    add.chunks(zip(range(100), range(100), strict=True), 10).apply_async()
    assert job_inserts.count == 1
    assert len(statuses(database_url)) == 10


def test_a_group_with_one_oversized_task_publishes_none_of_it(app: Any, database_url: str) -> None:
    @app.task(name="bulk.blob", shared=False)
    def blob(data: str) -> None: ...

    app.connection_for_write().ensure_connection()
    tasks = [blob.s("x") for _ in range(10)] + [blob.s("x" * 100_000)]
    with pytest.raises(PayloadTooLarge):
        group(tasks).apply_async()
    assert statuses(database_url) == []


def test_single_delays_still_insert_at_once(app: Any, database_url: str) -> None:
    @app.task(name="bulk.one", shared=False)
    def one() -> None: ...

    one.delay()
    assert len(statuses(database_url)) == 1


@pytest.mark.skipif(not hasattr(Producer, "batch"), reason="Producer.batch() is new in Kombu 5.7")
def test_a_loop_of_apply_async_inside_kombus_batch_is_one_insert(
    app: Any, database_url: str, job_inserts: Any
) -> None:
    @app.task(name="bulk.receipt", shared=False)
    def receipt(order_id: int) -> None: ...

    app.connection_for_write().ensure_connection()
    with app.producer_or_acquire() as producer, producer.batch():
        for order_id in range(300):
            receipt.apply_async((order_id,), producer=producer)
        assert statuses(database_url) == []  # nothing is written before the batch ends
    assert job_inserts.count == 1
    assert len(statuses(database_url)) == 300
