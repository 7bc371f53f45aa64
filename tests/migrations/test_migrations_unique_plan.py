"""A unique publish finds a key's holder through ux_jobs_unique_key_live, under a generic plan.

psycopg prepares the unique statement after a few runs, and PostgreSQL may then plan
it without the parameter values. The holder lookup (``unique_key = $n`` among queued
and running rows) must still be an index probe on the partial unique index, not a
scan of ``jobs``: this test prepares the real statement on 200,000 jobs, forces the
generic plan and EXPLAINs it. Run with ``-s`` to see the plan.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from celery_pgqueue.store import NewJob, Store
from celery_pgqueue.store.uniqueness import insert_unique_call

ROWS = 200_000

# Half of the jobs carry a key; 90% of all are completed (their keys are free).
FILL = f"""
INSERT INTO jobs (id, queue_name, status, priority, payload, unique_key, completed_at)
SELECT gen_random_uuid(), 'q',
       CASE WHEN i % 10 = 0 THEN 'queued' ELSE 'completed' END,
       100, '{{}}'::jsonb,
       CASE WHEN i % 2 = 0 THEN 't:k' || i END,
       CASE WHEN i % 10 = 0 THEN NULL ELSE now() END
FROM generate_series(1, {ROWS}) AS i
"""


@pytest.fixture(scope="module")
def generic_unique_plan(module_database_url: str) -> Iterator[str]:
    store = Store(module_database_url)
    store.ensure_queues(["q"])
    store.dispose()
    job = NewJob(id=uuid.uuid4(), queue_name="q", payload={}, unique_key="t:k10")
    call = insert_unique_call("public", job=job, channel=None)
    params = {k: (v.obj if isinstance(v, Jsonb) else v) for k, v in call.params.items()}
    with psycopg.connect(module_database_url) as conn:
        conn.execute(FILL.encode())
        conn.execute("ANALYZE jobs")
        conn.commit()
        conn.prepare_threshold = 0  # prepare on first use, as after 5 runs
        row = conn.execute(call.sql, call.params).fetchone()
        assert row is not None and row[3] is not None  # 't:k10' is held: a duplicate
        [prepared] = [
            name
            for (name, text) in conn.execute("SELECT name, statement FROM pg_prepared_statements")
            if "ON CONFLICT (unique_key)" in text
        ]
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", call.sql)))
        explain = sql.SQL("EXPLAIN EXECUTE {}({})").format(
            sql.Identifier(prepared),
            sql.SQL(", ").join(
                sql.Literal(str(params[n]) if isinstance(params[n], dict) else params[n])
                for n in names
            ),
        )
        plan = "\n".join(r[0] for r in conn.execute(explain.as_string(conn)).fetchall())
        conn.rollback()
    print(f"generic plan of the unique publish on {ROWS:,} jobs:\n{plan}")
    yield plan


def test_the_plan_is_generic(generic_unique_plan: str) -> None:
    assert "$" in generic_unique_plan
    assert "'t:k10'" not in generic_unique_plan


def test_the_holder_is_found_through_the_partial_unique_index(generic_unique_plan: str) -> None:
    assert "ux_jobs_unique_key_live" in generic_unique_plan
    assert "Seq Scan on jobs" not in generic_unique_plan
