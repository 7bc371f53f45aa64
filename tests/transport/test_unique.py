"""Unique tasks through Celery: ``apply_async(..., unique_key=...)`` and the task default.

A publish whose key (per task name) is held by a queued or running job returns that
job's ``AsyncResult`` instead of queueing another; once it finished, the key is free.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from celery import chord, group
from helpers import running_worker, wait_until
from kombu import Connection

from celery_pgqueue.errors import ConfigurationError
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.transaction import enqueue_in

from .conftest import Recorder

PRODUCER = Path(__file__).with_name("unique_producer.py")


def rows(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def live_jobs(database_url: str) -> list[tuple[Any, ...]]:
    return rows(
        database_url,
        "SELECT id, unique_key FROM jobs WHERE status IN ('queued', 'running') ORDER BY 2",
    )


def test_a_second_publish_with_the_key_returns_the_queued_jobs_id(make_app, database_url):
    app = make_app()

    @app.task(name="shop.charge", shared=False)
    def charge(order_id: int) -> None: ...

    @app.task(name="shop.refund", shared=False)
    def refund(order_id: int) -> None: ...

    first = charge.apply_async((42,), unique_key="order-42")
    second = charge.apply_async((42,), unique_key="order-42")
    other_task = refund.apply_async((42,), unique_key="order-42")

    assert second.id == first.id
    assert isinstance(second, type(first))
    assert other_task.id != first.id, "the key is per task name"
    assert live_jobs(database_url) == [
        (job_id_for(first.id), "shop.charge:order-42"),
        (job_id_for(other_task.id), "shop.refund:order-42"),
    ]


def test_a_publish_without_a_key_is_never_deduplicated(make_app, database_url):
    app = make_app()

    @app.task(name="shop.charge", shared=False)
    def charge(order_id: int) -> None: ...

    a, b = charge.delay(42), charge.delay(42)

    assert a.id != b.id
    assert rows(database_url, "SELECT count(*), count(unique_key) FROM jobs") == [(2, 0)]


def test_a_scheduled_job_holds_its_key(make_app, database_url):
    app = make_app()

    @app.task(name="shop.charge", shared=False)
    def charge(order_id: int) -> None: ...

    later = charge.apply_async((42,), countdown=3600, unique_key="order-42")

    assert charge.apply_async((42,), unique_key="order-42").id == later.id


@pytest.mark.worker
def test_the_key_is_free_again_once_the_job_has_finished(make_app, database_url):
    app = make_app()
    ran = Recorder()

    @app.task(name="shop.charge", shared=False)
    def charge(order_id: int) -> None:
        ran.add(order_id)

    first = charge.apply_async((42,), unique_key="order-42")
    assert charge.apply_async((42,), unique_key="order-42").id == first.id

    with running_worker(app):
        wait_until(lambda: ran.snapshot() == [42], timeout=20)
        wait_until(lambda: live_jobs(database_url) == [], timeout=20)
        again = charge.apply_async((42,), unique_key="order-42")
        wait_until(lambda: ran.snapshot() == [42, 42], timeout=20)

    assert again.id != first.id
    assert rows(database_url, "SELECT count(*) FROM jobs WHERE status = 'completed'") == [(2,)]


def test_the_task_default_derives_the_key_from_the_arguments(make_app, database_url):
    app = make_app()

    @app.task(name="shop.charge", shared=False, unique_key=True)
    def charge(order_id: int, currency: str = "EUR") -> None: ...

    a = charge.delay(42, currency="EUR")
    assert charge.apply_async((42,), {"currency": "EUR"}).id == a.id
    assert charge.delay(43).id != a.id
    assert charge.apply_async((42,), {"currency": "EUR"}, unique_key=False).id != a.id
    assert charge.apply_async((42,), unique_key="custom").id != a.id
    assert rows(database_url, "SELECT count(*), count(unique_key) FROM jobs") == [(4, 3)]


def test_the_task_default_may_be_a_function_of_the_arguments(make_app, database_url):
    app = make_app()

    def by_order(order_id: int, **_: Any) -> str:
        return f"order-{order_id}"

    @app.task(name="shop.charge", shared=False, unique_key=by_order)
    def charge(order_id: int, amount: int) -> None: ...

    a = charge.delay(42, amount=10)

    assert charge.delay(42, amount=99).id == a.id
    assert live_jobs(database_url) == [(job_id_for(a.id), "shop.charge:order-42")]


def test_send_task_by_name_takes_the_key_too(make_app, database_url):
    app = make_app()

    a = app.send_task("remote.task", (1,), unique_key="k")

    assert app.send_task("remote.task", (2,), unique_key="k").id == a.id


def test_a_key_that_is_not_text_is_refused(make_app):
    app = make_app()

    @app.task(name="shop.charge", shared=False)
    def charge(order_id: int) -> None: ...

    with pytest.raises(ConfigurationError, match="unique_key"):
        charge.apply_async((42,), unique_key=["order", 42])
    with pytest.raises(ConfigurationError, match="unique_key"):
        charge.apply_async((42,), unique_key="")


def test_a_plain_kombu_message_with_a_key_is_refused_and_nothing_is_written(
    broker_url, database_url
):
    with Connection(broker_url) as conn:
        producer = conn.Producer()
        with pytest.raises(ConfigurationError, match="only a Celery task message"):
            producer.publish({"n": 1}, routing_key="plain", unique_key="k", declare=[])

    assert rows(database_url, "SELECT count(*) FROM jobs") == [(0,)]


def test_a_long_key_is_stored_as_a_digest_and_still_unique(make_app, database_url):
    app = make_app()

    @app.task(name="shop.charge", shared=False)
    def charge(order_id: int) -> None: ...

    long_key = "x" * 1000
    a = charge.apply_async((1,), unique_key=long_key)

    assert charge.apply_async((1,), unique_key=long_key).id == a.id
    assert charge.apply_async((1,), unique_key=long_key + "y").id != a.id
    [(stored,)] = rows(database_url, "SELECT unique_key FROM jobs WHERE id = %s", job_id_for(a.id))
    assert len(stored) <= 255


def test_a_group_publishes_one_job_per_live_key(make_app, database_url):
    app = make_app()

    @app.task(name="shop.charge", shared=False, unique_key=True)
    def charge(order_id: int) -> None: ...

    result = group(charge.s(1), charge.s(2), charge.s(1)).apply_async()

    ids = [r.id for r in result.results]
    assert ids[0] == ids[2] != ids[1]
    assert rows(database_url, "SELECT count(*) FROM jobs") == [(2,)]


def test_a_chord_header_task_cannot_be_unique(make_app, broker_url, database_url):
    app = make_app(result_backend=broker_url)

    @app.task(name="shop.charge", shared=False, unique_key=True)
    def charge(order_id: int) -> None: ...

    @app.task(name="shop.report", shared=False)
    def report(results: list[Any]) -> None: ...

    with pytest.raises(ConfigurationError, match="chord"):
        chord([charge.s(1), charge.s(2)], report.s()).apply_async()


def test_a_unique_publish_inside_a_rolled_back_transaction_leaves_the_key_free(
    make_app, database_url
):
    app = make_app()

    @app.task(name="shop.charge", shared=False)
    def charge(order_id: int) -> None: ...

    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn, conn.begin() as tx:
            with enqueue_in(conn):
                inside = charge.apply_async((42,), unique_key="order-42")
                assert charge.apply_async((42,), unique_key="order-42").id == inside.id
            tx.rollback()
    finally:
        engine.dispose()

    after = charge.apply_async((42,), unique_key="order-42")
    assert after.id != inside.id
    assert live_jobs(database_url) == [(job_id_for(after.id), "shop.charge:order-42")]


@pytest.mark.worker
@pytest.mark.parametrize("where", ["task default", "call"])
def test_a_retry_of_a_unique_task_is_not_refused_by_its_own_key(make_app, database_url, where):
    app = make_app()
    ran = Recorder()
    default = {"unique_key": True} if where == "task default" else {}

    @app.task(name="shop.charge", shared=False, bind=True, **default)
    def charge(self: Any, order_id: int) -> None:
        ran.add(self.request.retries)
        if self.request.retries == 0:
            raise self.retry(countdown=0.1, max_retries=3)

    first = charge.apply_async((42,), **({} if default else {"unique_key": "order-42"}))
    assert live_jobs(database_url)[0][1] is not None
    with running_worker(app):
        wait_until(lambda: ran.snapshot() == [0, 1], timeout=20)
        wait_until(lambda: live_jobs(database_url) == [], timeout=20)

    assert rows(database_url, "SELECT id, status FROM jobs") == [
        (job_id_for(first.id), "completed")
    ]


def test_eight_producer_processes_racing_on_the_same_keys_create_one_job_per_key(
    broker_url, database_url
):
    keys = 20
    producers = [
        subprocess.Popen(
            [sys.executable, str(PRODUCER), broker_url, str(keys)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    try:
        for p in producers:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        for p in producers:  # "go" to all, as close together as a loop allows
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        returned = [p.communicate(timeout=60)[0].split() for p in producers]
    finally:
        for p in producers:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in producers] == [0] * 8

    stored = dict(rows(database_url, "SELECT unique_key, id FROM jobs"))
    assert len(stored) == keys
    assert rows(database_url, "SELECT count(*) FROM jobs") == [(keys,)]
    for n in range(keys):  # every producer got the one job of each key
        assert {job_id_for(ids[n]) for ids in returned} == {stored[f"shop.charge:order-{n}"]}
