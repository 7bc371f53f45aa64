"""Operator views (queue depth, throughput, running jobs) and the indexes maintenance needs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

Each view answers one question an operator asks with plain SQL (``psql``, Grafana, a
health check) and is what ``pgqueue status`` reads. The views name their tables
unqualified: the migration runs with ``search_path`` set to the target schema, and
PostgreSQL binds a view to the tables it resolved at creation, so a view in schema
``x`` always reads ``x.jobs`` whatever the reader's ``search_path``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Question: how much work is waiting in each queue, and for how long?
# One row per queue, including empty ones. "ready" rows are due now (run_at <= now())
# and unexpired; "scheduled" ones have a future run_at (countdown/eta). A transient
# message past its TTL counts in "queued" only until maintenance drops it.
JOB_QUEUE_DEPTH = """
CREATE VIEW job_queue_depth AS
SELECT
    q.name AS queue_name,
    q.is_active,
    q.default_priority,
    q.expires_at,
    coalesce(c.queued, 0) AS queued,
    coalesce(c.ready, 0) AS ready,
    coalesce(c.scheduled, 0) AS scheduled,
    coalesce(c.running, 0) AS running,
    coalesce(c.completed, 0) AS completed,
    coalesce(c.failed, 0) AS failed,
    coalesce(c.cancelled, 0) AS cancelled,
    c.oldest_ready_at,
    now() - c.oldest_ready_at AS oldest_ready_age,
    now() - c.oldest_started_at AS longest_running,
    coalesce(c.expired_leases, 0) AS expired_leases
FROM job_queues AS q
LEFT JOIN (
    SELECT
        queue_name,
        count(*) FILTER (WHERE status = 'queued') AS queued,
        count(*) FILTER (
            WHERE status = 'queued' AND run_at <= now()
            AND (expires_at IS NULL OR expires_at > now())
        ) AS ready,
        count(*) FILTER (
            WHERE status = 'queued' AND run_at > now()
            AND (expires_at IS NULL OR expires_at > now())
        ) AS scheduled,
        count(*) FILTER (WHERE status = 'running') AS running,
        count(*) FILTER (WHERE status = 'completed') AS completed,
        count(*) FILTER (WHERE status = 'failed') AS failed,
        count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
        min(run_at) FILTER (
            WHERE status = 'queued' AND run_at <= now()
            AND (expires_at IS NULL OR expires_at > now())
        ) AS oldest_ready_at,
        min(started_at) FILTER (WHERE status = 'running') AS oldest_started_at,
        count(*) FILTER (
            WHERE status = 'running' AND lease_expires_at < now()
        ) AS expired_leases
    FROM jobs
    GROUP BY queue_name
) AS c ON c.queue_name = q.name
"""

# Question: how fast is each queue finishing work, and how much of it fails?
# A job counts once, when it reaches its final status (a Celery retry is not a
# failure). Reads only jobs changed in the last hour through ix_jobs_finished, so it
# stays cheap however long retention is; a window longer than completed_retention
# undercounts, because pruned jobs are gone.
JOB_QUEUE_THROUGHPUT = """
CREATE VIEW job_queue_throughput AS
SELECT
    q.name AS queue_name,
    coalesce(t.completed_5m, 0) AS completed_5m,
    coalesce(t.failed_5m, 0) AS failed_5m,
    coalesce(t.completed_1h, 0) AS completed_1h,
    coalesce(t.failed_1h, 0) AS failed_1h,
    round(coalesce(t.completed_5m + t.failed_5m, 0) / 5.0, 2) AS per_minute_5m,
    round(coalesce(t.completed_1h + t.failed_1h, 0) / 60.0, 2) AS per_minute_1h,
    round(t.failed_5m::numeric / nullif(t.completed_5m + t.failed_5m, 0), 4)
        AS failure_rate_5m,
    round(t.failed_1h::numeric / nullif(t.completed_1h + t.failed_1h, 0), 4)
        AS failure_rate_1h
FROM job_queues AS q
LEFT JOIN (
    SELECT
        queue_name,
        count(*) FILTER (
            WHERE status = 'completed' AND completed_at > now() - interval '5 minutes'
        ) AS completed_5m,
        count(*) FILTER (
            WHERE status = 'failed' AND failed_at > now() - interval '5 minutes'
        ) AS failed_5m,
        count(*) FILTER (
            WHERE status = 'completed' AND completed_at > now() - interval '1 hour'
        ) AS completed_1h,
        count(*) FILTER (
            WHERE status = 'failed' AND failed_at > now() - interval '1 hour'
        ) AS failed_1h
    FROM jobs
    -- updated_at is set with completed_at/failed_at, so this prefilter loses nothing
    -- and lets ix_jobs_finished (status, updated_at) find the last hour's rows.
    WHERE status IN ('completed', 'failed') AND updated_at > now() - interval '1 hour'
    GROUP BY queue_name
) AS t ON t.queue_name = q.name
"""

# Question: what is running right now, for how long, and is any lease stuck?
# lease_remaining below zero means the holder stopped heartbeating: maintenance will
# requeue the job (or fail it, if the worker had acked it early).
JOB_RUNNING = """
CREATE VIEW job_running AS
SELECT
    id,
    queue_name,
    payload -> 'headers' ->> 'task' AS task,
    attempt_count AS attempt,
    lease_owner,
    started_at,
    now() - started_at AS running_for,
    lease_expires_at,
    lease_expires_at - now() AS lease_remaining,
    coalesce(lease_expires_at < now(), false) AS lease_expired,
    acked_at IS NOT NULL AS acked
FROM jobs
WHERE status = 'running'
"""

VIEWS = (
    ("job_queue_depth", JOB_QUEUE_DEPTH),
    ("job_queue_throughput", JOB_QUEUE_THROUGHPUT),
    ("job_running", JOB_RUNNING),
)


def upgrade() -> None:
    # Maintenance drops transient messages past their TTL; only they have expires_at,
    # so this partial index stays tiny and the idle check is one index probe.
    op.create_index(
        "ix_jobs_expiring",
        "jobs",
        ["expires_at"],
        postgresql_where=sa.text("status = 'queued' AND expires_at IS NOT NULL"),
    )
    # jobs.queue_name references job_queues: without an index on it, deleting a queue
    # (expiry, queue_delete) checks the foreign key with a scan of all of jobs.
    op.create_index("ix_jobs_queue_name", "jobs", ["queue_name"])
    # Capping job_logs per job looks only at jobs claimed more than once; first
    # attempts (nearly every job) never enter this index.
    op.create_index(
        "ix_jobs_retried",
        "jobs",
        ["attempt_count"],
        postgresql_where=sa.text("attempt_count > 1"),
    )
    for _, ddl in VIEWS:
        op.execute(ddl)


def downgrade() -> None:
    for name, _ in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_index("ix_jobs_retried", table_name="jobs")
    op.drop_index("ix_jobs_queue_name", table_name="jobs")
    op.drop_index("ix_jobs_expiring", table_name="jobs")
