"""The claims' SQL: a queue's due jobs taken by one worker, with or without a limit.

Plain text like the rest of :mod:`~celery_pgqueue.store.queries`, which renders it
per schema (``{jobs}``, ``{job_queues}``, ``{job_logs}``), writes ``{limit}`` in and
adds pending acks (``{acked}``). Both claims end with :data:`CLAIMED`.
"""

from __future__ import annotations

# Take up to {limit} due jobs of an active queue without a concurrency limit, lowest
# priority number first, and open each one's attempt in job_logs: one round trip. The
# locking SELECT is a CTE so LIMIT and SKIP LOCKED apply before the update: concurrent
# claimers pass over each other's rows instead of waiting, and each row is claimed by
# exactly one of them. {acked}: pending early acks riding along (MARK_ACKED as a CTE);
# they touch running rows, the claim queued ones, so the two updates never meet the
# same row. A limited queue claims nothing here: the last column (CLAIM_TAIL) tells the
# worker its limit, and it claims through CLAIM_LIMITED from then on.
CLAIM = """
WITH {acked}ready AS (
    SELECT id FROM {jobs}
    WHERE queue_name = %(queue_name)s::varchar
      AND status = 'queued'
      AND run_at <= now()
      AND (expires_at IS NULL OR expires_at > now())
      AND EXISTS (SELECT FROM {job_queues}
                  WHERE name = %(queue_name)s::varchar AND is_active
                    AND concurrency_limit IS NULL)
    ORDER BY priority, run_at, created_at
    LIMIT {limit}
    FOR UPDATE SKIP LOCKED
), {claimed}
"""

# Taking the jobs in `ready`, shared by both claims.
CLAIMED = """claimed AS (
    UPDATE {jobs}
    SET status = 'running',
        attempt_count = jobs.attempt_count + 1,
        started_at = now(),
        updated_at = now(),
        lease_owner = %(owner)s::varchar,
        lease_expires_at = now() + %(lease)s::float8 * interval '1 second',
        acked_at = NULL
    FROM {chosen}
    WHERE jobs.id = {chosen}.id
    RETURNING jobs.id, jobs.queue_name, jobs.payload, jobs.priority, jobs.attempt_count,
              jobs.max_attempts, jobs.run_at, jobs.created_at, jobs.expires_at
), opened AS (
    INSERT INTO {job_logs} (job_id, attempt_number, status, started_at)
    SELECT id, attempt_count, 'attempting', now() FROM claimed
), told AS (
    -- The "drained" note (listener.claim_note_prefix): a claim woken by a NOTIFY or
    -- by a job coming due that took fewer than it asked for tells the other workers,
    -- at its commit, that they need not claim (no transaction of its own: it rides on
    -- this one); when it began says which scheduled jobs it covered.
    SELECT pg_notify(%(channel)s::text,
                     %(drained)s::text || extract(epoch FROM now())::float8::text)
    WHERE %(drained)s::text IS NOT NULL AND (SELECT count(*) FROM claimed) < {limit}
)
-- One row per claimed job, or one of NULLs when none was: each carries the queue's
-- concurrency limit, so an empty claim still says whether the queue is limited.
SELECT claimed.id, claimed.queue_name, claimed.payload, claimed.priority,
       claimed.attempt_count, claimed.max_attempts,
       -- the worker's own expiry check must agree with the database's clock
       extract(epoch FROM claimed.expires_at - now())::float8,
       q.concurrency_limit
FROM {job_queues} AS q
LEFT OUTER JOIN claimed ON true
WHERE q.name = %(queue_name)s::varchar AND (SELECT count(*) FROM told) >= 0
ORDER BY claimed.priority, claimed.run_at, claimed.created_at"""

# A queue with a concurrency limit: at most that many of its jobs are running at once,
# claimed-but-not-started (prefetched) ones included. Sent with CLAIM_LIMITED in one
# pipeline, so one round trip and one implicit transaction: this row lock serialises
# the queue's claimers until the commit. FOR NO KEY UPDATE, not FOR UPDATE: publishes
# (their foreign-key check takes FOR KEY SHARE on the row) never wait for it.
LOCK_QUEUE = """
SELECT FROM {job_queues} WHERE name = %(queue_name)s::varchar FOR NO KEY UPDATE
"""

# The claim of a limited queue, after LOCK_QUEUE. Why not one statement: under READ
# COMMITTED a statement sees the rows committed when it began, so a count of running
# jobs inside the claim that locks would miss the claim another worker commits
# meanwhile, and both would fill the same free slot. This statement begins after the
# lock is ours, when every earlier claim of the queue has committed: its count is
# exact, and no other claim of the queue commits before ours. `slots`: the free slots
# (the whole batch when the limit was removed meanwhile); `ready` locks a batch in
# claim order with {limit} written in (a generic plan keeps ix_jobs_ready), `chosen`
# keeps the first `free` of them.
CLAIM_LIMITED = """
WITH {acked}slots AS (
    SELECT CASE WHEN q.concurrency_limit IS NULL THEN {limit}
                ELSE greatest(0, q.concurrency_limit - (
                    SELECT count(*) FROM {jobs}
                    WHERE queue_name = %(queue_name)s::varchar AND status = 'running'))
           END AS free
    FROM {job_queues} AS q
    WHERE q.name = %(queue_name)s::varchar AND q.is_active
), ready AS (
    SELECT id, priority, run_at, created_at FROM {jobs}
    WHERE queue_name = %(queue_name)s::varchar
      AND status = 'queued'
      AND run_at <= now()
      AND (expires_at IS NULL OR expires_at > now())
      AND EXISTS (SELECT FROM slots WHERE free > 0)
    ORDER BY priority, run_at, created_at
    LIMIT {limit}
    FOR UPDATE SKIP LOCKED
), chosen AS (
    SELECT id FROM ready
    ORDER BY priority, run_at, created_at
    LIMIT (SELECT free FROM slots)
), {claimed}
"""
