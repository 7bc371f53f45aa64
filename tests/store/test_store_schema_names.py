"""Any schema name PostgreSQL accepts holds the tier: quoting is never the user's job."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from celery_pgqueue.migrate import current, head_revision, upgrade
from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import NewJob, Store

SCHEMAS = [
    "Tier",  # upper case: needs quoting
    'ti"er -- ü',  # a quote, a space, a comment marker, a non-ASCII letter
    "public; DROP TABLE jobs",  # reads like SQL, is only a name
    "1tier",
    "Ω" * 31 + "x",  # 63 bytes in UTF-8
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_the_tier_works_in_any_schema_postgresql_accepts(database_url: str, schema: str) -> None:
    upgrade(database_url, schema=schema)
    assert current(database_url, schema=schema) == head_revision()
    store = Store(database_url, PgQueueOptions.parse({"schema": schema}))
    job_id = uuid.uuid4()
    try:
        store.check_schema()
        store.enqueue([NewJob(id=job_id, queue_name="celery", payload={"headers": {}})])
        [claimed] = store.claim("celery", 1, "owner")
        assert store.finish(
            job_id,
            attempt=claimed.attempt,
            status=JobStatus.COMPLETED,
            log_status=LogStatus.SUCCESS,
        )
        assert [q.name for q in store.queue_status()] == ["celery"]
    finally:
        store.dispose()
    with psycopg.connect(database_url, autocommit=True) as db:
        rows = db.execute(
            sql.SQL("SELECT id, status FROM {}.jobs").format(sql.Identifier(schema))
        ).fetchall()
        assert rows == [(job_id, "completed")]
        assert db.execute("SELECT count(*) FROM public.jobs").fetchone() == (0,)
