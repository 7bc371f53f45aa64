"""``FINISH_MANY``: the finish writes of many tasks (state, result, log row, ack) in one
statement.

A worker node's completion writer (:mod:`celery_pgqueue.completions`) collects the
finishes of tasks that ended close together and sends them here as one statement and
one commit instead of one round trip per task per pool process. Each row keeps exactly
:data:`~celery_pgqueue.store.queries.FINISH`'s rules: fenced by its attempt, a
completed job is never overwritten, the attempt's log row is closed once, waiting
clients are notified at commit (a small success riding in its notification), and a
full limited queue is woken when a job leaves ``running``. A ready state also records
the ack (``acked_at``): the task ran to its end, so a late ack written after it has
nothing left to say, and one lost with a crashed worker changes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb

from celery_pgqueue.states import FINISHED, JobStatus, LogStatus
from celery_pgqueue.storable import printable
from celery_pgqueue.store.hot import Call
from celery_pgqueue.store.queries import RESULT_NOTE, render

FINISH_MANY = """
WITH v AS (
    SELECT * FROM unnest(
        %(job_ids)s::uuid[], %(attempts)s::integer[], %(statuses)s::varchar[],
        %(log_statuses)s::varchar[], %(log_messages)s::text[], %(results)s::jsonb[],
        %(max_attempts)s::integer[], %(errors)s::varchar[], %(notify)s::boolean[],
        %(inline)s::boolean[])
        AS v(job_id, attempt, status, log_status, log_message, result, max_attempts,
             error_message, notify, inline)
), closed AS (
    UPDATE {job_logs}
    SET status = v.log_status,
        log_message = v.log_message,
        finished_at = now(),
        duration = now() - job_logs.started_at
    FROM v
    WHERE v.log_status IS NOT NULL
      AND job_logs.job_id = v.job_id
      AND job_logs.attempt_number = coalesce(
          v.attempt, (SELECT attempt_count FROM {jobs} WHERE id = v.job_id))
      AND job_logs.status = 'attempting'
), updated AS (
    UPDATE {jobs}
    SET status = v.status,
        result = coalesce(v.result, jobs.result),
        max_attempts = coalesce(v.max_attempts, jobs.max_attempts),
        completed_at = CASE WHEN v.status = 'completed' THEN now() ELSE jobs.completed_at END,
        failed_at = CASE WHEN v.status = 'failed' THEN now() ELSE jobs.failed_at END,
        last_error_message = CASE WHEN v.status = 'failed' THEN v.error_message
                                  ELSE jobs.last_error_message END,
        started_at = CASE WHEN v.status = 'running' THEN coalesce(jobs.started_at, now())
                          ELSE jobs.started_at END,
        acked_at = CASE WHEN v.status IN ('completed', 'failed', 'cancelled')
                        THEN coalesce(jobs.acked_at, now()) ELSE jobs.acked_at END,
        -- a running job keeps its lease; every other status drops it
        lease_owner = CASE WHEN v.status = 'running' THEN jobs.lease_owner END,
        lease_expires_at = CASE WHEN v.status = 'running' THEN jobs.lease_expires_at END,
        updated_at = now()
    FROM v
    WHERE jobs.id = v.job_id
      -- locked first, in id order, as queries.MARK_ACKED and HEARTBEAT lock theirs
      AND jobs.id = ANY(ARRAY(
          SELECT id FROM {jobs} WHERE id IN (SELECT job_id FROM v)
          ORDER BY id FOR NO KEY UPDATE))
      AND jobs.status <> 'completed'
      AND (v.attempt IS NULL OR jobs.attempt_count = v.attempt)
      AND (v.attempt IS NULL OR v.status <> 'queued' OR jobs.status = 'queued')
    RETURNING jobs.id, jobs.queue_name, v.status, v.notify,
              CASE WHEN v.inline THEN jobs.result::text END AS result_text,
              jobs.completed_at
)
SELECT count(*),
       count(pg_notify(
           %(result_channel)s::text,
           {result_note}
       )) FILTER (WHERE notify AND %(result_channel)s::text IS NOT NULL),
       -- as FINISH: a job leaving running in a queue its limit had filled frees a slot
       (SELECT count(pg_notify(%(channel)s::text, q.name))
        FROM (SELECT DISTINCT queue_name FROM updated WHERE status <> 'running') AS u
        JOIN {job_queues} AS q ON q.name = u.queue_name
        WHERE %(channel)s::text IS NOT NULL
          AND CASE WHEN q.concurrency_limit IS NULL THEN false
                   ELSE (SELECT count(*) FROM {jobs}
                         WHERE queue_name = q.name AND status = 'running')
                        >= q.concurrency_limit END),
       array_agg(id)
FROM updated
"""


@dataclass(frozen=True, slots=True)
class Finish:
    """One task's finish write, as :data:`FINISH_MANY` takes it (a transport-owned row)."""

    job_id: UUID
    attempt: int | None
    status: JobStatus
    log_status: LogStatus | None
    result: Any = None
    max_attempts: int | None = None
    error_message: str | None = None
    log_message: str | None = None
    notify: bool = False
    """Wake the clients waiting for this result (a ready state, NOTIFY on)."""


@functools.cache
def finish_many_sql(schema: str) -> str:
    """``FINISH_MANY`` for tables in ``schema``, rendered once."""
    return render(FINISH_MANY, schema, result_note=RESULT_NOTE)


def finish_many_call(
    schema: str, finishes: Sequence[Finish], *, result_channel: str | None, channel: str | None
) -> Call:
    """One statement writing every finish of ``finishes``; returns (rows changed,
    notifications, queue wake-ups, ids changed)."""
    return Call(
        finish_many_sql(schema),
        {
            "job_ids": [f.job_id for f in finishes],
            "attempts": [f.attempt for f in finishes],
            "statuses": [f.status.value for f in finishes],
            "log_statuses": [
                None if f.log_status is None else f.log_status.value for f in finishes
            ],
            "log_messages": [
                printable(f.log_message) if f.log_message else f.log_message for f in finishes
            ],
            "results": [None if f.result is None else Jsonb(f.result) for f in finishes],
            "max_attempts": [f.max_attempts for f in finishes],
            # text columns refuse NUL and lone surrogates: such characters become escapes.
            "errors": [printable(f.error_message or "")[:255] or None for f in finishes],
            "notify": [f.notify for f in finishes],
            # a success small enough rides in its notification (notify.result_note)
            "inline": [
                f.notify and f.status is JobStatus.COMPLETED and f.result is not None
                for f in finishes
            ],
            "result_channel": result_channel,
            "channel": channel,
        },
    )


def is_final(status: JobStatus) -> bool:
    """Whether ``status`` ends the job's run (what records its ack)."""
    return status in FINISHED
