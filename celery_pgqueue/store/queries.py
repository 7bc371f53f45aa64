"""The per-task statements, written once as SQL: enqueue, claim, ack, finish, heartbeat.

The two claims' text is in :mod:`~celery_pgqueue.store.claims`; this module renders
every statement for a schema.

Each runs once or more per task, so it is plain SQL sent by psycopg
(:mod:`~celery_pgqueue.store.hot`), not a SQLAlchemy construct compiled per call.
Parameters are psycopg's named placeholders; each is cast, so a ``None`` has a type.
Table names are ours; only the schema comes from configuration, and it goes in as a
quoted identifier (:func:`for_schema`). ``{limit}`` and the statuses are written into
the text: under a generic (prepared) plan a bound LIMIT is guessed as 10% of the ready
rows, and a bound status cannot match the partial indexes declared on ``status``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from psycopg import sql

from celery_pgqueue.store.claims import CLAIM, CLAIM_LIMITED, CLAIMED, LOCK_QUEUE
from celery_pgqueue.store.listener import SCHEDULED_MARK
from celery_pgqueue.store.notify import INLINE_RESULT_BYTES

# What the row of a re-published task id becomes (Celery's retry re-sends the id):
# back in line with the new message ({new}: its values); attempts and logs stay. A
# live row keeps its unique key (a retry is still that job); a finished one gave its
# key up and runs again without it, since a newer job may hold the key by now.
REQUEUE_SET = """status = 'queued',
        queue_name = {new}.queue_name,
        payload = {new}.payload,
        priority = {new}.priority,
        run_at = {new}.run_at,
        max_attempts = coalesce({new}.max_attempts, jobs.max_attempts),
        expires_at = {new}.expires_at,
        lease_owner = NULL,
        lease_expires_at = NULL,
        acked_at = NULL,
        unique_key = CASE WHEN jobs.status IN ('queued', 'running') THEN jobs.unique_key END,
        updated_at = now()"""

# Insert (or, for a re-published task id, re-queue) jobs, then wake the workers: once
# per queue with a job due now, and once per queue with scheduled jobs, saying when
# the soonest comes due (see listener.wake_note). The NOTIFYs fire at commit. A
# cancelled job stays cancelled: cancel is durable. Intervals count from the
# statement, by the database's clock: not now(), which inside a caller's long
# transaction (enqueue_in) is when that began. One row: (rows written, NOTIFYs, NOTIFYs).
# The two wake-up counts of an enqueue's SELECT list, over the rows it wrote ({written}):
# one NOTIFY per queue with a job due now, one per queue with scheduled jobs saying when
# the soonest comes due. ENQUEUE and uniqueness.ENQUEUE_UNIQUE both end with them.
WAKE_WORKERS = """(SELECT count(pg_notify(%(channel)s::text, due.queue_name))
     FROM (SELECT DISTINCT queue_name FROM {written}
           WHERE run_at <= statement_timestamp()) AS due
     WHERE %(channel)s::text IS NOT NULL),
    (SELECT count(pg_notify(
                %(channel)s::text,
                scheduled.queue_name || {mark}
                || round(extract(epoch FROM scheduled.run_at - statement_timestamp())::numeric, 3)
                   ::text))
     FROM (SELECT queue_name, min(run_at) AS run_at FROM {written}
           WHERE run_at > statement_timestamp() GROUP BY queue_name) AS scheduled
     WHERE %(channel)s::text IS NOT NULL)"""

# What a process owes the workers for publishes that committed without a NOTIFY
# (store/wakeups.py): one NOTIFY per queue, in a transaction of its own, which writes
# no WAL and so holds the notify lock only briefly. One row: (NOTIFYs).
WAKE_QUEUES = """SELECT count(pg_notify(%(channel)s::text, q))
FROM unnest(%(queues)s::text[]) AS q"""

ENQUEUE = """
WITH inserted AS (
    INSERT INTO {jobs} (id, queue_name, payload, priority, run_at, max_attempts, expires_at)
    SELECT v.id,
           v.queue_name,
           v.payload,
           coalesce(v.priority, q.default_priority, 100),
           coalesce(statement_timestamp() + v.delay * interval '1 second', v.run_at, now()),
           v.max_attempts,
           -- the message's own TTL or its queue's x-message-ttl, whichever is shorter
           statement_timestamp() + least(v.ttl, q.message_ttl) * interval '1 second'
    FROM {new_jobs}
    LEFT OUTER JOIN {job_queues} AS q ON q.name = v.queue_name
    ON CONFLICT (id) DO UPDATE
    SET {requeue}
    WHERE jobs.status <> 'cancelled'
    RETURNING jobs.queue_name, jobs.run_at
)
SELECT
    (SELECT count(*) FROM inserted),
    {wake}
""".replace("{wake}", WAKE_WORKERS.replace("{written}", "inserted"))

# The rows ENQUEUE inserts. One job as scalars: psycopg escapes every quote of every
# payload inside a jsonb[] with a regular expression, which for a single publish was
# most of the client's CPU. A batch as one array per column: the SQL text is the same
# for 2 or 10,000 jobs, so it is prepared once and a batch is one round trip.
ONE_NEW_JOB = """(
    SELECT %(id)s::uuid AS id,
           %(queue_name)s::varchar AS queue_name,
           %(payload)s::jsonb AS payload,
           %(priority)s::integer AS priority,
           %(run_at)s::timestamptz AS run_at,
           %(max_attempts)s::integer AS max_attempts,
           %(ttl)s::float8 AS ttl,
           %(delay)s::float8 AS delay
) AS v"""

NEW_JOBS = """unnest(
    %(ids)s::uuid[], %(queues)s::varchar[], %(payloads)s::jsonb[], %(priorities)s::integer[],
    %(run_ats)s::timestamptz[], %(max_attempts)s::integer[], %(ttls)s::float8[],
    %(delays)s::float8[]
) AS v(id, queue_name, payload, priority, run_at, max_attempts, ttl, delay)"""

# Every statement that updates many jobs rows of a worker at once (these early acks,
# riding on a claim; batches.FINISH_MANY; the lease renewal HEARTBEAT; REQUEUE and
# DELETE_HELD of held deliveries) locks them in id order first: two such statements on
# different connections of one node, each locking its rows in its own join order,
# deadlocked on the rows they share, and each deadlock stalled both for
# deadlock_timeout (1 s) before the server rolled one back.
# ORDER BY below FOR NO KEY UPDATE: the rows are locked as the sort returns them, in
# an ARRAY() sub-select, which runs once before the update (as `id IN (...)` it ran
# again for every candidate row: measured 3-6 % off a prefork drain).

# Early acks: from now a lost worker means failed, not requeued. Held deliveries are
# (id, attempt) pairs from two arrays, one SQL text for any count.
MARK_ACKED = """
UPDATE {jobs}
SET acked_at = now()
WHERE status = 'running'
  AND acked_at IS NULL
  AND id = ANY(ARRAY(
      SELECT held.id FROM {jobs} AS held
      WHERE held.status = 'running'
        AND held.acked_at IS NULL
        AND (held.id, held.attempt_count) IN (
            SELECT * FROM unnest(%(held_ids)s::uuid[], %(held_attempts)s::integer[]))
      ORDER BY held.id
      FOR NO KEY UPDATE))
"""

# Put held deliveries back in line (reject with requeue, warm shutdown, restore). Only
# rows still running at that attempt move, so a late requeue can't rerun finished
# work or steal a newer attempt; the attempt's log row is closed as retry.
REQUEUE = """
WITH moved AS (
    UPDATE {jobs}
    SET status = 'queued',
        lease_owner = NULL,
        lease_expires_at = NULL,
        acked_at = NULL,
        updated_at = now()
    WHERE status = 'running'
      AND id = ANY(ARRAY(
          SELECT held.id FROM {jobs} AS held
          WHERE held.status = 'running'
            AND (held.id, held.attempt_count) IN (
                SELECT * FROM unnest(%(held_ids)s::uuid[], %(held_attempts)s::integer[]))
          ORDER BY held.id
          FOR NO KEY UPDATE))
    RETURNING id, attempt_count, queue_name
), closed AS (
    UPDATE {job_logs}
    SET status = 'retry',
        log_message = 'requeued',
        finished_at = now(),
        duration = now() - job_logs.started_at
    FROM moved
    WHERE job_logs.job_id = moved.id
      AND job_logs.attempt_number = moved.attempt_count
      AND job_logs.status = 'attempting'
)
SELECT count(*),
       (SELECT count(pg_notify(%(channel)s::text, notified.queue_name))
        FROM (SELECT DISTINCT queue_name FROM moved) AS notified
        WHERE %(channel)s::text IS NOT NULL)
FROM moved
"""

# Move one job to %(status)s and close its attempt's log row. %(attempt)s fences the
# write to the delivery that ran it (NULL: any attempt, for result-backend writes of
# tasks another broker carried). A finished success is never overwritten. A fenced
# 'queued' (Celery's RETRY) only updates a row its retry already re-queued: a row
# still running was never re-published (a cold shutdown reports early-acked tasks as
# RETRY), and requeueing it here would run an acked task twice. NULL parameters leave
# their column as it was. The log row is closed even when the job row has moved on (a
# retry re-published and claimed before this write): it records what this attempt
# did. %(result_channel)s: the result backend's waiters, woken at commit and only if
# the row changed; a success small enough rides in the notification (notify.result_note).
# %(channel)s: the workers' channel, told when a limited queue has a free slot.
# One row: (rows changed, NOTIFYs, NOTIFYs).
FINISH = """
WITH closed AS (
    UPDATE {job_logs}
    SET status = %(log_status)s::varchar,
        log_message = %(log_message)s::text,
        finished_at = now(),
        duration = now() - job_logs.started_at
    WHERE %(log_status)s::varchar IS NOT NULL
      AND job_logs.job_id = %(job_id)s::uuid
      AND job_logs.attempt_number = coalesce(
          %(attempt)s::integer,
          (SELECT attempt_count FROM {jobs} WHERE id = %(job_id)s::uuid))
      AND job_logs.status = 'attempting'
), updated AS (
    UPDATE {jobs}
    SET status = %(status)s::varchar,
        result = coalesce(%(result)s::jsonb, jobs.result),
        max_attempts = coalesce(%(max_attempts)s::integer, jobs.max_attempts),
        completed_at = CASE WHEN %(status)s::varchar = 'completed' THEN now()
                            ELSE jobs.completed_at END,
        failed_at = CASE WHEN %(status)s::varchar = 'failed' THEN now()
                         ELSE jobs.failed_at END,
        last_error_message = CASE WHEN %(status)s::varchar = 'failed'
                                  THEN %(error_message)s::varchar
                                  ELSE jobs.last_error_message END,
        started_at = CASE WHEN %(status)s::varchar = 'running'
                          THEN coalesce(jobs.started_at, now())
                          ELSE jobs.started_at END,
        run_at = CASE WHEN %(status)s::varchar = 'queued'
                      THEN coalesce(%(run_at)s::timestamptz, jobs.run_at)
                      ELSE jobs.run_at END,
        -- a running job keeps its lease; every other status drops it
        lease_owner = CASE WHEN %(status)s::varchar = 'running' THEN jobs.lease_owner END,
        lease_expires_at = CASE WHEN %(status)s::varchar = 'running'
                                THEN jobs.lease_expires_at END,
        updated_at = now()
    WHERE jobs.id = %(job_id)s::uuid
      AND jobs.status <> 'completed'
      AND (%(attempt)s::integer IS NULL OR jobs.attempt_count = %(attempt)s::integer)
      AND (%(attempt)s::integer IS NULL OR %(status)s::varchar <> 'queued'
           OR jobs.status = 'queued')
    RETURNING jobs.id,
              jobs.queue_name,
              CASE WHEN %(inline)s::boolean THEN jobs.result::text END AS result_text,
              jobs.completed_at
)
SELECT count(*),
       count(pg_notify(
           %(result_channel)s::text,
           {result_note}
       )) FILTER (WHERE %(result_channel)s::text IS NOT NULL),
       -- A job that stops running in a queue its limit had filled frees a slot: wake
       -- the workers, who found the queue full and wait for a NOTIFY naming it. Not
       -- for every finish: a NOTIFY per task halved the throughput of a queue whose
       -- limit never binds. (This statement's count does not see a claim that commits
       -- while it runs; the worker whose claim filled the queue looks once more
       -- shortly after, poller.LIMIT_RECHECK, for the slot such a finish frees.)
       (SELECT count(pg_notify(%(channel)s::text, q.name))
        FROM updated AS u
        JOIN {job_queues} AS q ON q.name = u.queue_name
        WHERE %(status)s::varchar <> 'running'
          AND %(channel)s::text IS NOT NULL
          AND CASE WHEN q.concurrency_limit IS NULL THEN false
                   ELSE (SELECT count(*) FROM {jobs}
                         WHERE queue_name = q.name AND status = 'running')
                        >= q.concurrency_limit END)
FROM updated
"""

# Extend the leases the owner still holds. Only jobs the worker can vouch for are
# extended: a job whose pool process died lets its lease lapse, and rescue settles it.
HEARTBEAT = """
UPDATE {jobs}
SET lease_expires_at = now() + %(lease)s::float8 * interval '1 second'
WHERE status = 'running'
  AND lease_owner = %(owner)s::varchar
  AND id = ANY(ARRAY(
      SELECT mine.id FROM {jobs} AS mine
      WHERE mine.status = 'running'
        AND mine.lease_owner = %(owner)s::varchar
        AND mine.id = ANY(%(ids)s::uuid[])
      ORDER BY mine.id
      FOR NO KEY UPDATE))
"""

# Consumed messages that are not Celery tasks keep no history.
DELETE_HELD = """
DELETE FROM {jobs}
WHERE id = ANY(ARRAY(
    SELECT held.id FROM {jobs} AS held
    WHERE (held.id, held.attempt_count) IN (
        SELECT * FROM unnest(%(held_ids)s::uuid[], %(held_attempts)s::integer[]))
    ORDER BY held.id
    FOR UPDATE))
"""


@dataclass(frozen=True)
class Queries:
    """The statements above as sent for one schema, rendered once."""

    schema: str
    enqueue_one: str
    enqueue_many: str
    mark_acked: str
    requeue: str
    finish: str
    heartbeat: str
    delete_held: str
    lock_queue: str
    _claims: dict[tuple[int, bool, bool], str] = field(default_factory=dict, compare=False)

    def claim(self, limit: int, *, with_acks: bool, limited: bool = False) -> str:
        """CLAIM (or CLAIM_LIMITED) with ``limit`` written in: one text, so one prepared
        plan, per limit."""
        key = (limit, with_acks, limited)
        text = self._claims.get(key)
        if text is None:
            acked = sql.SQL("acked AS ({}), ").format(sql.SQL(self.mark_acked))
            # Both templates are constants: joined as text, then rendered as one.
            template = (CLAIM_LIMITED if limited else CLAIM).replace("{claimed}", CLAIMED)
            text = self._claims[key] = render(
                template,
                self.schema,
                limit=sql.Literal(int(limit)),
                acked=acked if with_acks else sql.SQL(""),
                chosen=sql.SQL("chosen" if limited else "ready"),
            )
        return text


@functools.cache
def for_schema(schema: str) -> Queries:
    """Every per-task statement for tables in ``schema``."""
    return Queries(
        schema=schema,
        enqueue_one=render(ENQUEUE, schema, new_jobs=sql.SQL(ONE_NEW_JOB), **_ENQUEUE_ARGS),
        enqueue_many=render(ENQUEUE, schema, new_jobs=sql.SQL(NEW_JOBS), **_ENQUEUE_ARGS),
        mark_acked=render(MARK_ACKED, schema),
        requeue=render(REQUEUE, schema),
        finish=render(FINISH, schema, result_note=RESULT_NOTE),
        heartbeat=render(HEARTBEAT, schema),
        delete_held=render(DELETE_HELD, schema),
        lock_queue=render(LOCK_QUEUE, schema),
    )


# A finished job's results notification: the id, and for a small result its completion
# time and JSON too, so the waiter reads nothing (FINISH and FINISH_MANY both send it).
RESULT_NOTE = sql.SQL(
    """CASE WHEN octet_length(result_text) <= {inline_bytes}
                THEN id::text || ' ' || extract(epoch FROM completed_at)::text
                     || ' ' || result_text
                ELSE id::text END"""
).format(inline_bytes=sql.Literal(INLINE_RESULT_BYTES))

_ENQUEUE_ARGS = {
    "mark": sql.Literal(SCHEDULED_MARK),
    "requeue": sql.SQL(REQUEUE_SET.replace("{new}", "excluded")),
}


def _table(schema: str, name: str) -> sql.Composable:
    # The default schema stays unqualified, as the rest of the store's statements are
    # (found through search_path); any other is a quoted identifier.
    if schema == "public":
        return sql.SQL(name)
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.SQL(name))


def render(template: str, schema: str, **parts: sql.Composable) -> str:
    """A statement template with this schema's tables (and ``parts``) filled in, as text."""
    query = sql.SQL(template.strip()).format(
        jobs=_table(schema, "jobs"),
        job_logs=_table(schema, "job_logs"),
        job_queues=_table(schema, "job_queues"),
        **parts,
    )
    return query.as_string(None)
