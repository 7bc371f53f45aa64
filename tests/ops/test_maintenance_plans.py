"""An idle maintenance pass is index probes only, under generic plans, on a big table.

Every worker runs a pass every few seconds, so a statement that scans ``jobs`` or
``job_logs`` when there is nothing to do would cost the whole table per worker per
interval. psycopg prepares a statement after a few runs and PostgreSQL may then use a
generic plan; this test captures every statement of a real pass, prepares each as
psycopg does, forces the generic plan and checks it scans neither table.

Run with ``-s`` to see the plans.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from celery_pgqueue.maintenance import run_once
from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.store import Store

pytestmark = pytest.mark.slow

ROWS = 200_000

# Finished jobs too young to prune, waiting and running jobs with live leases, one
# log row each: a busy tier where a pass finds nothing to do. Queue 'gone' expired
# but still has a running job, so every pass looks at it again.
FILL = f"""
INSERT INTO job_queues (name) VALUES ('q0'), ('q1');
INSERT INTO job_queues (name, expires_at) VALUES ('gone', now() - interval '1 minute');
INSERT INTO jobs (id, queue_name, status, priority, started_at, attempt_count, lease_owner,
                  lease_expires_at)
VALUES (gen_random_uuid(), 'gone', 'running', 100, now(), 1, 'w', now() + interval '1 hour');
INSERT INTO jobs (id, queue_name, status, priority, payload, run_at, created_at,
                  updated_at, completed_at, started_at, attempt_count, lease_owner,
                  lease_expires_at)
SELECT gen_random_uuid(), 'q' || (i % 2),
       CASE WHEN i % 10 < 6 THEN 'completed' WHEN i % 10 < 9 THEN 'queued'
            ELSE 'running' END,
       100, '{{}}'::jsonb, now(), now(), now(),
       CASE WHEN i % 10 < 6 THEN now() END,
       CASE WHEN i % 10 <> 6 AND i % 10 <> 7 AND i % 10 <> 8 THEN now() END,
       CASE WHEN i % 10 < 6 OR i % 10 = 9 THEN 1 ELSE 0 END,
       CASE WHEN i % 10 = 9 THEN 'w' END,
       CASE WHEN i % 10 = 9 THEN now() + interval '1 hour' END
FROM generate_series(1, {ROWS}) AS i;
INSERT INTO job_logs (job_id, status, attempt_number, started_at, finished_at)
SELECT id, CASE WHEN status = 'running' THEN 'attempting' ELSE 'success' END, 1, now(),
       CASE WHEN status = 'running' THEN NULL ELSE now() END
FROM jobs WHERE attempt_count = 1;
ANALYZE jobs;
ANALYZE job_logs;
ANALYZE job_queues;
"""


def generic_plan(conn: psycopg.Connection[Any], statement: str, params: dict[str, Any]) -> str:
    """EXPLAIN of ``statement`` prepared by psycopg, under a forced generic plan."""
    with conn.transaction(force_rollback=True):
        conn.execute(statement, params, prepare=True)
        name = conn.execute(
            "SELECT name FROM pg_prepared_statements WHERE name LIKE '_pg3_%%' "
            "ORDER BY prepare_time DESC LIMIT 1"
        ).fetchone()
        assert name is not None
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        # psycopg numbers named parameters by first appearance.
        names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", statement)))
        args = sql.SQL(", ").join(sql.Literal(params[n]) for n in names)
        explain = sql.SQL("EXPLAIN EXECUTE {}" + ("({})" if names else "")).format(
            sql.Identifier(name[0]), args
        )
        return "\n".join(row[0] for row in conn.execute(explain))


@pytest.fixture(scope="module")
def idle_pass_plans(module_database_url: str) -> Iterator[list[tuple[str, str]]]:
    """(statement, generic plan) of every statement an idle maintenance pass runs."""
    with psycopg.connect(module_database_url, autocommit=True) as conn:
        conn.execute(FILL.encode())
    store = Store(module_database_url, PgQueueOptions())
    store.check_schema()  # as a worker has, before its first pass
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        sent.append((statement, params))

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    try:
        report = run_once(store, completed_retention=86_400)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)
        store.dispose()
    assert report.ran and report.pruned.completed == 0 and report.rescued == 0
    plans = []
    with psycopg.connect(module_database_url) as conn:
        for statement, params in sent:
            if "advisory" in statement:
                continue
            plans.append((statement, generic_plan(conn, statement, params or {})))
    for statement, plan in plans:
        print(f"\n{' '.join(statement.split())[:160]}\n{plan}")
    yield plans


def test_an_idle_pass_runs_every_step(idle_pass_plans: list[tuple[str, str]]) -> None:
    # rescue; the metrics' fold of finished jobs; expired tasks; expired messages;
    # expired queues (find them, their waiting messages, the queues); prune (completed,
    # cancelled, failed, old logs, logs over the cap)
    assert len(idle_pass_plans) == 12


@pytest.mark.parametrize("table", ["jobs", "job_logs"])
def test_no_statement_of_an_idle_pass_scans_a_big_table(
    idle_pass_plans: list[tuple[str, str]], table: str
) -> None:
    scans = [
        " ".join(statement.split())[:120]
        for statement, plan in idle_pass_plans
        if re.search(rf"Seq Scan on {table}\b", plan)
    ]
    assert scans == []


def test_an_idle_workers_wake_up_look_up_probes_the_index(
    idle_pass_plans: list[tuple[str, str]], module_database_url: str
) -> None:
    """``next_due`` runs whenever a worker wakes for a scheduled job: no scan either."""
    store = Store(module_database_url, PgQueueOptions())
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        sent.append((statement, params))

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    try:
        store.next_due(["q0", "q1"])
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)
        store.dispose()
    [(statement, params)] = sent
    with psycopg.connect(module_database_url) as conn:
        plan = generic_plan(conn, statement, params)
    print(plan)
    assert not re.search(r"Seq Scan on jobs\b", plan), plan
