"""The unique publish: insert a job unless a live job holds its key, in one statement.

The partial unique index ``ux_jobs_unique_key_live`` (migration 0007) admits one
queued or running row per ``unique_key``; it, not a lookup before the insert, decides
which of several racing producers wins. Kept apart from ENQUEUE
(:mod:`~celery_pgqueue.store.queries`) so a publish without a key runs exactly the
statement it ran before. Sent by :mod:`~celery_pgqueue.store.hot` like the others.
"""

from __future__ import annotations

import functools

from psycopg import sql

from celery_pgqueue.store.hot import Call
from celery_pgqueue.store.listener import SCHEDULED_MARK
from celery_pgqueue.store.queries import REQUEUE_SET, WAKE_WORKERS, render
from celery_pgqueue.store.records import NewJob, one_job_params

# One job. Its values are computed once (v), as ENQUEUE computes them. The same task
# id again (Celery's retry) re-queues its row as ENQUEUE does, so a retry is never
# refused by the key its own row holds. Otherwise the INSERT names the partial index
# as its arbiter: a live row with the key (committed, or committed while this one
# waited on the index) makes it do nothing. DO NOTHING, not a no-op DO UPDATE: a
# duplicate publish writes nothing and takes no lock on a job a worker may hold.
# The holder is read in the statement's snapshot, so one that committed after that
# began is not seen: the fourth column is then NULL and the caller sends the
# statement again (a new snapshot). One row: (rows written, NOTIFYs, NOTIFYs, id of
# the live job, its task id when it is another job's, whether that job is past its
# expires).
ENQUEUE_UNIQUE = """
WITH v AS (
    SELECT n.id,
           n.queue_name,
           n.payload,
           coalesce(n.priority, q.default_priority, 100) AS priority,
           coalesce(statement_timestamp() + n.delay * interval '1 second', n.run_at, now())
               AS run_at,
           n.max_attempts,
           statement_timestamp() + least(n.ttl, q.message_ttl) * interval '1 second'
               AS expires_at,
           n.unique_key
    FROM (SELECT %(id)s::uuid AS id,
                 %(queue_name)s::varchar AS queue_name,
                 %(payload)s::jsonb AS payload,
                 %(priority)s::integer AS priority,
                 %(run_at)s::timestamptz AS run_at,
                 %(max_attempts)s::integer AS max_attempts,
                 %(ttl)s::float8 AS ttl,
                 %(delay)s::float8 AS delay,
                 %(unique_key)s::varchar AS unique_key) AS n
    LEFT OUTER JOIN {job_queues} AS q ON q.name = n.queue_name
), requeued AS (
    UPDATE {jobs}
    SET {requeue}
    FROM v
    WHERE jobs.id = v.id AND jobs.status <> 'cancelled'
    RETURNING jobs.queue_name, jobs.run_at
), inserted AS (
    INSERT INTO {jobs} (id, queue_name, payload, priority, run_at, max_attempts, expires_at,
                        unique_key)
    SELECT id, queue_name, payload, priority, run_at, max_attempts, expires_at, unique_key
    FROM v
    WHERE NOT EXISTS (SELECT FROM {jobs} AS same WHERE same.id = v.id)
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND status IN ('queued', 'running')
    DO NOTHING
    RETURNING jobs.queue_name, jobs.run_at
), written AS (
    SELECT queue_name, run_at FROM requeued
    UNION ALL
    SELECT queue_name, run_at FROM inserted
), holder AS (
    SELECT held.id,
           coalesce(held.payload->'headers'->>'id', held.id::text) AS task_id,
           -- past its expires (rescue.IS_EXPIRED): it will never run, so the caller
           -- settles it as expired and publishes again
           held.status = 'queued' AND held.expires_at <= now() AS expired
    FROM {jobs} AS held
    WHERE held.unique_key = %(unique_key)s::varchar
      AND held.status IN ('queued', 'running')
      AND held.id <> %(id)s::uuid
)
SELECT
    (SELECT count(*) FROM written),
    {wake},
    CASE WHEN EXISTS (SELECT FROM inserted)
              OR EXISTS (SELECT FROM {jobs} AS same WHERE same.id = %(id)s::uuid)
         THEN %(id)s::uuid
         ELSE (SELECT id FROM holder) END,
    (SELECT task_id FROM holder),
    coalesce((SELECT expired FROM holder), false)
""".replace("{wake}", WAKE_WORKERS.replace("{written}", "written"))


@functools.cache
def for_schema(schema: str) -> str:
    """ENQUEUE_UNIQUE for tables in ``schema``."""
    return render(
        ENQUEUE_UNIQUE,
        schema,
        mark=sql.Literal(SCHEDULED_MARK),
        requeue=sql.SQL(REQUEUE_SET.replace("{new}", "v")),
    )


def insert_unique_call(schema: str, *, job: NewJob, channel: str | None) -> Call:
    """Write ``job`` unless a live job holds ``job.unique_key``; see ENQUEUE_UNIQUE."""
    if not job.unique_key:
        raise ValueError("insert_unique_call: the job has no unique_key")
    return Call(for_schema(schema), {**one_job_params(job, channel), "unique_key": job.unique_key})
