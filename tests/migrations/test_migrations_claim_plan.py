"""The claim keeps using ix_jobs_ready under a generic plan, on a million jobs.

psycopg prepares a statement server-side after ``prepare_threshold`` runs, and
PostgreSQL may then switch to a generic plan built without the parameter values. A
plain EXPLAIN shows only the custom plan, so this test has psycopg prepare the real
claim statement, forces the generic plan and EXPLAINs that prepared statement.

Run with ``-s`` to see the plan.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from celery_pgqueue.store import Store
from celery_pgqueue.store import jobs as job_sql

ROWS = 1_000_000
QUEUES = ("q0", "q1", "q2")

# 40% completed, 30% queued and due, 30% queued for an hour from now; three queues;
# seven priorities; created over the last 1,000 seconds.
FILL = f"""
INSERT INTO jobs (id, queue_name, status, priority, payload, run_at, created_at,
                  updated_at, completed_at, attempt_count)
SELECT gen_random_uuid(),
       'q' || (i % 3),
       CASE WHEN i % 10 < 4 THEN 'completed' ELSE 'queued' END,
       (i % 7) * 10,
       jsonb_build_object('task', 'tests.plan', 'n', i),
       CASE WHEN i % 10 >= 7 THEN now() + interval '1 hour'
            ELSE now() - (i % 1000) * interval '1 second' END,
       now() - (i % 1000) * interval '1 second',
       now(),
       CASE WHEN i % 10 < 4 THEN now() END,
       CASE WHEN i % 10 < 4 THEN 1 ELSE 0 END
FROM generate_series(1, {ROWS}) AS i
"""


@pytest.fixture(scope="module")
def generic_claim_plan(module_database_url: str) -> Iterator[str]:
    """EXPLAIN of the claim statement as psycopg prepares it, under a generic plan."""
    store = Store(module_database_url)
    store.ensure_queues(list(QUEUES))
    started = time.monotonic()
    with psycopg.connect(module_database_url, autocommit=True) as conn:
        conn.execute(FILL.encode())
        conn.execute("ANALYZE jobs")
        conn.execute("ANALYZE job_queues")
    print(f"\nfilled and analyzed {ROWS:,} jobs in {time.monotonic() - started:.1f}s")

    sent: list[tuple[str, dict[str, Any]]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        sent.append((statement, params))

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    try:
        with store.engine.connect() as conn:
            driver = conn.connection.dbapi_connection
            assert isinstance(driver, psycopg.Connection)
            driver.prepare_threshold = 0  # prepare on first use, as after 5 runs
            with conn.begin() as transaction:
                claimed = job_sql.claim(
                    conn, queue_name="q1", limit=10, owner="plan", lease_seconds=30.0
                )
                assert len(claimed) == 10
                statement, params = sent[-1]
                # psycopg numbers named parameters by first appearance.
                names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", statement)))
                [prepared] = [
                    name
                    for name, text in conn.exec_driver_sql(
                        "SELECT name, statement FROM pg_prepared_statements"
                    )
                    if "SKIP LOCKED" in text and name.startswith("_pg3_")
                ]
                conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
                explain = sql.SQL("EXPLAIN EXECUTE {}({})").format(
                    sql.Identifier(prepared),
                    sql.SQL(", ").join(sql.Literal(params[name]) for name in names),
                )
                plan = "\n".join(conn.exec_driver_sql(explain.as_string(driver)).scalars())
                transaction.rollback()
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)
        store.dispose()
    print(f"generic plan of the claim on {ROWS:,} jobs:\n{plan}")
    yield plan


@pytest.mark.slow
def test_generic_claim_plan_is_generic(generic_claim_plan: str) -> None:
    # A generic plan keeps the parameters: the queue name appears as $1, not 'q1'.
    assert "$1" in generic_claim_plan
    assert "'q1'" not in generic_claim_plan


@pytest.mark.slow
def test_generic_claim_plan_reads_ready_rows_through_ix_jobs_ready(
    generic_claim_plan: str,
) -> None:
    assert "Index Scan using ix_jobs_ready on jobs" in generic_claim_plan


@pytest.mark.slow
def test_generic_claim_plan_never_scans_the_whole_jobs_table(generic_claim_plan: str) -> None:
    assert "Seq Scan on jobs" not in generic_claim_plan


@pytest.fixture(scope="module")
def generic_limited_claim_plan(module_database_url: str, generic_claim_plan: str) -> str:
    """EXPLAIN of a limited queue's claim, prepared by psycopg, under a generic plan.

    After ``generic_claim_plan``: the million jobs are there; 2 % of q2's run.
    """
    store = Store(module_database_url)
    with psycopg.connect(module_database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE jobs SET status = 'running' WHERE queue_name = 'q2' AND status = 'completed'"
            " AND random() < 0.05"
        )
        conn.execute("UPDATE job_queues SET concurrency_limit = 1000000 WHERE name = 'q2'")
        conn.execute("ANALYZE jobs")
    try:
        with store.engine.connect() as conn:
            driver = conn.connection.dbapi_connection
            assert isinstance(driver, psycopg.Connection)
            driver.prepare_threshold = 0
            with conn.begin() as transaction:
                lock = job_sql.lock_queue_call(store.queries, queue_name="q2")
                claim = job_sql.claim_call(
                    store.queries,
                    queue_name="q2",
                    limit=10,
                    owner="plan",
                    lease_seconds=30.0,
                    limited=True,
                )
                lock.rows(conn)
                assert len(job_sql.claimed_jobs(claim.rows(conn)).jobs) == 10
                names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", claim.sql)))
                [prepared] = [
                    name
                    for name, text in conn.exec_driver_sql(
                        "SELECT name, statement FROM pg_prepared_statements"
                    )
                    if "chosen AS" in text and name.startswith("_pg3_")
                ]
                conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
                explain = sql.SQL("EXPLAIN EXECUTE {}({})").format(
                    sql.Identifier(prepared),
                    sql.SQL(", ").join(sql.Literal(claim.params[name]) for name in names),
                )
                plan = "\n".join(conn.exec_driver_sql(explain.as_string(driver)).scalars())
                transaction.rollback()
    finally:
        store.dispose()
    print(f"generic plan of a limited queue's claim:\n{plan}")
    return plan


@pytest.mark.slow
def test_generic_limited_claim_plan_counts_running_jobs_through_ix_jobs_running(
    generic_limited_claim_plan: str,
) -> None:
    assert "$1" in generic_limited_claim_plan
    assert "on ix_jobs_running" in generic_limited_claim_plan  # index or bitmap scan
    assert "Index Scan using ix_jobs_ready on jobs" in generic_limited_claim_plan
    assert "Seq Scan on jobs" not in generic_limited_claim_plan
