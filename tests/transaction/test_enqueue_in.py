"""Enqueue inside the caller's transaction: the task commits or rolls back with the data."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from helpers import running_worker, wait_until
from tx_support import statuses

from celery_pgqueue.errors import TransactionError
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.transaction import enqueue_in

pytestmark = pytest.mark.worker


def test_rollback_leaves_no_job_and_commit_makes_it_visible(app, engine, database_url):
    @app.task(name="tx.confirm", shared=False)
    def confirm(order_id: int) -> None: ...

    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO orders VALUES (1)")
        with enqueue_in(conn):
            confirm.delay(1)
            # Inside the transaction the row exists only for the caller.
            assert statuses(database_url) == []
        raise RuntimeError("roll back")
    assert statuses(database_url) == []

    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO orders VALUES (2)")
        with enqueue_in(conn):
            result = confirm.delay(2)
        assert statuses(database_url) == []
    assert statuses(database_url) == [(job_id_for(result.id), "queued")]


def test_a_thousand_task_group_inside_one_transaction_is_all_or_nothing(app, engine, database_url):
    from celery import group

    @app.task(name="tx.n", shared=False)
    def n(i: int) -> None: ...

    with pytest.raises(RuntimeError), engine.begin() as conn, enqueue_in(conn):
        group(n.s(i) for i in range(1000)).apply_async()
        raise RuntimeError("roll back")
    assert statuses(database_url) == []

    with engine.begin() as conn, enqueue_in(conn):
        group(n.s(i) for i in range(1000)).apply_async()
    assert len(statuses(database_url)) == 1000


def test_the_task_runs_after_commit_and_sees_the_callers_data(app, engine, database_url):
    seen: list[Any] = []

    @app.task(name="tx.check", shared=False)
    def check(order_id: int) -> None:
        with psycopg.connect(database_url, autocommit=True) as c:
            seen.append(c.execute("SELECT id FROM orders WHERE id = %s", (order_id,)).fetchone())

    with running_worker(app):
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO orders VALUES (7)")
            with enqueue_in(conn):
                check.delay(7)
        wait_until(lambda: seen, timeout=15)
    assert seen == [(7,)]


def test_publishing_after_the_transaction_ended_is_a_clear_error(app, engine, database_url):
    @app.task(name="tx.late", shared=False)
    def late() -> None: ...

    with engine.connect() as conn:
        with enqueue_in(conn):
            conn.commit()
            with pytest.raises(TransactionError, match="already ended"):
                late.delay()
    assert statuses(database_url) == []


def test_enqueue_in_refuses_what_is_not_a_connection() -> None:
    with pytest.raises(TransactionError, match="SQLAlchemy Connection or Session"):
        with enqueue_in(object()):
            pass


def test_a_connection_to_another_database_is_refused(app, pg_server_url, database_url):
    import uuid

    from psycopg import sql

    other = f"cpq_other_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    try:
        base = pg_server_url.rsplit("/", 1)[0].split("://", 1)[1]
        engine = sa.create_engine(f"postgresql+psycopg://{base}/{other}")

        @app.task(name="tx.elsewhere", shared=False)
        def elsewhere() -> None: ...

        with engine.begin() as conn, enqueue_in(conn):
            with pytest.raises(TransactionError, match="the broker uses"):
                elsewhere.delay()
        engine.dispose()
        assert statuses(database_url) == []
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(other))
            )
