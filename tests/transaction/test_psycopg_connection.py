"""enqueue_in() on a plain psycopg 3 connection: the caller's transaction, untouched."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from helpers import running_worker, wait_until
from tx_support import statuses

from celery_pgqueue.errors import TransactionError
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.transaction import enqueue_in

pytestmark = pytest.mark.worker


@pytest.fixture
def orders(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    return database_url


def test_rollback_leaves_nothing_and_the_callers_later_statements_share_the_commit(
    app: Any, orders: str
) -> None:
    @app.task(name="txp.confirm", shared=False)
    def confirm(order_id: int) -> None: ...

    with psycopg.connect(orders) as conn:
        conn.execute("INSERT INTO orders VALUES (1)")
        with enqueue_in(conn):
            confirm.delay(1)
        conn.rollback()
    assert statuses(orders) == []

    with psycopg.connect(orders) as conn:
        with enqueue_in(conn):
            result = confirm.delay(2)  # the job's INSERT opens the transaction
        conn.execute("INSERT INTO orders VALUES (2)")  # still the same transaction
        assert statuses(orders) == []
        conn.commit()
    assert statuses(orders) == [(job_id_for(result.id), "queued")]
    with psycopg.connect(orders) as conn:
        assert conn.execute("SELECT id FROM orders").fetchall() == [(2,)]


def test_inside_conn_transaction_a_worker_runs_the_task_after_commit(app: Any, orders: str) -> None:
    seen: list[Any] = []

    @app.task(name="txp.check", shared=False)
    def check(order_id: int) -> None:
        with psycopg.connect(orders, autocommit=True) as c:
            seen.append(c.execute("SELECT id FROM orders WHERE id = %s", (order_id,)).fetchone())

    with running_worker(app):
        with psycopg.connect(orders, autocommit=True) as conn:
            with conn.transaction(), enqueue_in(conn):
                check.delay(5)
                conn.execute("INSERT INTO orders VALUES (5)")
        wait_until(lambda: seen, timeout=15)
    assert seen == [(5,)]


def test_autocommit_without_a_transaction_is_refused(app: Any, orders: str) -> None:
    @app.task(name="txp.auto", shared=False)
    def auto() -> None: ...

    with psycopg.connect(orders, autocommit=True) as conn, enqueue_in(conn):
        with pytest.raises(TransactionError, match="autocommit mode"):
            auto.delay()
    assert statuses(orders) == []


def test_a_failed_or_closed_transaction_is_refused(app: Any, orders: str) -> None:
    @app.task(name="txp.failed", shared=False)
    def failed() -> None: ...

    with psycopg.connect(orders) as conn, enqueue_in(conn):
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO orders VALUES (1), (1)")
        with pytest.raises(TransactionError, match="roll it back"):
            failed.delay()
        conn.rollback()
    conn = psycopg.connect(orders)
    conn.close()
    with enqueue_in(conn), pytest.raises(TransactionError, match="already ended"):
        failed.delay()
    assert statuses(orders) == []


def test_a_thousand_task_group_is_one_statement_on_the_callers_connection(
    app: Any, orders: str, job_inserts: Any
) -> None:
    from celery import group

    @app.task(name="txp.n", shared=False)
    def n(i: int) -> None: ...

    app.connection_for_write().ensure_connection()  # queue and pool ready outside the count
    with psycopg.connect(orders) as conn:
        with enqueue_in(conn):
            group(n.s(i) for i in range(1000)).apply_async()
        assert job_inserts.count == 1
        assert statuses(orders) == []
        conn.rollback()
    assert statuses(orders) == []


@pytest.mark.slow
def test_workers_are_woken_by_the_commit_not_by_polling(app: Any, orders: str) -> None:
    app.conf.broker_transport_options = {"polling_interval": 60.0, "maintenance_interval": 5.0}
    started: list[float] = []

    @app.task(name="txp.woken", shared=False)
    def woken() -> None:
        started.append(time.monotonic())

    with running_worker(app):
        time.sleep(0.5)  # the worker is idle, asleep on LISTEN, next poll in a minute
        with psycopg.connect(orders) as conn:
            with enqueue_in(conn):
                woken.delay()
            time.sleep(1.0)
            assert started == []  # not visible before the commit
            conn.commit()
            committed = time.monotonic()
        wait_until(lambda: started, timeout=10, message="the task starts after the commit")
    assert started[0] - committed < 5.0  # the NOTIFY sent at commit, not the 60 s poll
