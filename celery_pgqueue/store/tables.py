"""SQLAlchemy Core tables: the schema's source of truth for statements.

The three tables are the seed's (``../shared/seed/queue-jobs-er.md``) column for column.
The additions Celery needs are marked ``# +`` and listed in the README's schema section.
Migrations spell their columns out instead of importing this module; a test compares
the migrated database with this metadata.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import INTERVAL, JSONB, UUID

TZ = sa.TIMESTAMP(timezone=True)

metadata = sa.MetaData()

job_queues = sa.Table(
    "job_queues",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("default_priority", sa.Integer, nullable=False, server_default="100"),
    sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    # + queues declared with x-expires (remote-control mailboxes, event receivers) are
    # dropped when unused this long, so short-lived consumers leave nothing behind.
    sa.Column("expires_at", TZ),
    # + seconds a message may wait in this queue (Kombu's x-message-ttl), applied at
    # insert whoever publishes; None: messages wait until consumed.
    sa.Column("message_ttl", sa.Float),
    # + at most this many of the queue's jobs run at once across all workers (migration
    # 0007, ``celery pgqueue set-limit``); None: no limit.
    sa.Column("concurrency_limit", sa.Integer),
    sa.CheckConstraint(
        "concurrency_limit IS NULL OR concurrency_limit >= 0",
        name="ck_job_queues_concurrency_limit",
    ),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column(
        "queue_name",
        sa.String(100),
        sa.ForeignKey("job_queues.name", onupdate="CASCADE", name="fk_jobs_queue_name"),
        nullable=False,
    ),
    sa.Column("status", sa.String(50), nullable=False, server_default="queued"),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("payload", JSONB),
    sa.Column("attempt_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer),
    sa.Column("run_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("started_at", TZ),
    sa.Column("completed_at", TZ),
    sa.Column("failed_at", TZ),
    sa.Column("last_error_message", sa.String(255)),
    # clock_timestamp, not now(): rows of one transaction keep their enqueue order.
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.clock_timestamp()),
    sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
    # + Celery's result meta (state, return value or exception, children).
    sa.Column("result", JSONB),
    # + who holds a running job and until when: orphan rescue without re-running live work.
    sa.Column("lease_owner", sa.String(255)),
    sa.Column("lease_expires_at", TZ),
    # + set when the worker acked early: a lost worker then means "failed", not "requeue".
    sa.Column("acked_at", TZ),
    # + message TTL (Kombu's ``expiration``, Celery's ``expires``): control replies and
    # events that nobody consumed in time are never delivered and are pruned; tasks are
    # never delivered either and end cancelled (Celery's REVOKED, "expired").
    sa.Column("expires_at", TZ),
    # + unique tasks (migration 0007): at most one live (queued or running) job per key;
    # the key names the task too, so two tasks may use the same application key.
    sa.Column("unique_key", sa.String(255)),
    sa.CheckConstraint(
        "status IN ('queued', 'running', 'completed', 'failed', 'cancelled')",
        name="ck_jobs_status",
    ),
)

# Claims read ready rows in this order; a literal WHERE keeps the index usable by
# generic (prepared) plans, where a bound status parameter could not prove it.
sa.Index(
    "ix_jobs_ready",
    jobs.c.queue_name,
    jobs.c.priority,
    jobs.c.run_at,
    jobs.c.created_at,
    postgresql_where=sa.text("status = 'queued'"),
)
# Unique tasks: the database refuses a second live job with the same key.
sa.Index(
    "ux_jobs_unique_key_live",
    jobs.c.unique_key,
    unique=True,
    postgresql_where=sa.text("unique_key IS NOT NULL AND status IN ('queued', 'running')"),
)
# A limited queue's running jobs, counted by its claims (store/claims.py) and by
# finishes in it (queries.FINISH): only running rows, so the count stays cheap however
# many finished jobs the queue keeps.
sa.Index(
    "ix_jobs_running",
    jobs.c.queue_name,
    postgresql_where=sa.text("status = 'running'"),
)
# Orphan rescue: running jobs whose lease ran out.
sa.Index(
    "ix_jobs_lease",
    jobs.c.lease_expires_at,
    postgresql_where=sa.text("status = 'running'"),
)
# Retention: finished jobs by age.
sa.Index(
    "ix_jobs_finished",
    jobs.c.status,
    jobs.c.updated_at,
    postgresql_where=sa.text("status IN ('completed', 'failed', 'cancelled')"),
)

job_logs = sa.Table(
    "job_logs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.func.gen_random_uuid()),
    sa.Column(
        "job_id",
        UUID(as_uuid=True),
        sa.ForeignKey("jobs.id", ondelete="CASCADE", name="fk_job_logs_job_id"),
        nullable=False,
    ),
    sa.Column("status", sa.String(50), nullable=False, server_default="attempting"),
    sa.Column("log_message", sa.Text),
    sa.Column("attempt_number", sa.Integer, nullable=False),
    sa.Column("started_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("finished_at", TZ),
    sa.Column("duration", INTERVAL),
    sa.CheckConstraint(
        "status IN ('attempting', 'success', 'retry', 'failed')", name="ck_job_logs_status"
    ),
)
sa.Index("ix_job_logs_job_id", job_logs.c.job_id, job_logs.c.attempt_number)
sa.Index("ix_job_logs_started_at", job_logs.c.started_at)

# + Exchange bindings, shared by every process: a producer routes exactly as the
# workers declared (fanout for remote control, topic for events and routes).
job_bindings = sa.Table(
    "job_bindings",
    metadata,
    sa.Column("exchange", sa.String(255), primary_key=True),
    sa.Column("routing_key", sa.String(255), primary_key=True),
    sa.Column(
        "queue_name",
        sa.String(100),
        sa.ForeignKey("job_queues.name", ondelete="CASCADE", name="fk_job_bindings_queue_name"),
        primary_key=True,
    ),
    sa.Column("exchange_type", sa.String(20), nullable=False),
    sa.CheckConstraint(
        "exchange_type IN ('direct', 'topic', 'fanout')", name="ck_job_bindings_exchange_type"
    ),
)
sa.Index("ix_job_bindings_queue_name", job_bindings.c.queue_name)

# -- result backend: groups and native chords (migration 0002) ------------------------

# + A saved GroupResult, and the counter that starts a chord's body exactly once: the
# last header task to finish claims the body in the same transaction that counts it,
# so no ``celery.chord_unlock`` task polls for completion.
job_groups = sa.Table(
    "job_groups",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    # Celery's result tuple of the group ([id, [children]]), JSON like jobs.result.
    sa.Column("result", JSONB),
    # Header parts that must finish (set_chord_size), plus parts added later (add_to_chord).
    sa.Column("chord_size", sa.Integer),
    sa.Column("chord_added", sa.Integer, nullable=False, server_default="0"),
    sa.Column("chord_done", sa.Integer, nullable=False, server_default="0"),
    # Set once, by the transaction that counted the last part: it publishes the body.
    sa.Column("chord_started_at", TZ),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
)
# Retention: groups by age.
sa.Index("ix_job_groups_updated_at", job_groups.c.updated_at)

# + One row per counted header part: a part that runs twice (redelivery, lease rescue)
# counts once, and the body's arguments are read in header order. No foreign key to
# jobs: a header task that ignores its result may have no row. Deleted once the body
# is published.
job_chord_parts = sa.Table(
    "job_chord_parts",
    metadata,
    sa.Column(
        "group_id",
        UUID(as_uuid=True),
        sa.ForeignKey("job_groups.id", ondelete="CASCADE", name="fk_job_chord_parts_group_id"),
        primary_key=True,
    ),
    sa.Column("task_id", UUID(as_uuid=True), primary_key=True),
    # Celery's group_index; -1 when it gives none (sorted last, as Redis does).
    sa.Column("group_index", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(50), nullable=False),
    sa.Column("counted_at", TZ, nullable=False, server_default=sa.func.clock_timestamp()),
)

# -- NOTIFY channels (migration 0004) -------------------------------------------------

# + The two NOTIFY channel names of this schema, random per migrated schema: any role
# that may connect can LISTEN on a channel it can name, so only roles that may read
# this table (the application's) learn them. ``queues`` wakes workers (payload: a
# queue name), ``results`` wakes result waiters (payload: a job id, maybe its result).
job_channels = sa.Table(
    "job_channels",
    metadata,
    sa.Column("purpose", sa.String(20), primary_key=True),
    sa.Column("name", sa.String(63), nullable=False),
    sa.CheckConstraint("purpose IN ('queues', 'results')", name="ck_job_channels_purpose"),
)

# -- operations: indexes maintenance needs (migration 0003) ---------------------------

# Maintenance drops waiting transient messages past their TTL and records expired
# tasks; only rows with a TTL are in it, so the idle check is one probe.
sa.Index(
    "ix_jobs_expiring",
    jobs.c.expires_at,
    postgresql_where=sa.text("status = 'queued' AND expires_at IS NOT NULL"),
)
# The foreign key jobs.queue_name -> job_queues.name: without it, deleting a queue
# (expiry, queue_delete) checks the key by scanning all of jobs.
sa.Index("ix_jobs_queue_name", jobs.c.queue_name)
# Capping job_logs per job looks only at jobs claimed more than once.
sa.Index("ix_jobs_retried", jobs.c.attempt_count, postgresql_where=sa.text("attempt_count > 1"))

# -- periodic tasks and metrics counters (migration 0006) -----------------------------

# + The state of `celery beat`'s entries, one row per entry of one schedule
# (``beat_name``: several apps share a database). beat_schedule defines an entry; this
# row says whether it is enabled and when it last sent, durably, for whichever beat
# process leads. ``schedule`` is a readable copy of the definition, for operators.
job_schedules = sa.Table(
    "job_schedules",
    metadata,
    sa.Column("beat_name", sa.String(100), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("task", sa.String(255), nullable=False),
    sa.Column("schedule", sa.String(255), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    # When the last tick was sent, by the database's clock; NULL: never (the first
    # tick is then due one period after created_at, as with Celery's own schedulers).
    sa.Column("last_run_at", TZ),
    sa.Column("total_run_count", sa.Integer, nullable=False, server_default="0"),
    # The task id (jobs.id) of the last tick sent.
    sa.Column("last_job_id", UUID(as_uuid=True)),
    # The leader's estimate of the next tick, for operators (never read back).
    sa.Column("next_run_at", TZ),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
)

# + Who sends a schedule's ticks: the one beat process whose lease has not expired.
# ``fence`` grows whenever another process takes over; a send is one transaction that
# renews this row only if holder and fence are still the sender's.
job_beat_leases = sa.Table(
    "job_beat_leases",
    metadata,
    sa.Column("beat_name", sa.String(100), primary_key=True),
    sa.Column("holder", sa.String(255), nullable=False),
    sa.Column("fence", sa.BigInteger, nullable=False),
    sa.Column("acquired_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("renewed_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("expires_at", TZ, nullable=False),
)

# + Monotonic totals for metrics, which retention must not take back: finished jobs
# per queue and status (folded in by maintenance from ``jobs``), lease rescues
# (queue_name ''), and the ``mark`` row whose ``counted_until`` says up to when
# finished jobs have been counted.
job_counters = sa.Table(
    "job_counters",
    metadata,
    sa.Column("counter", sa.String(50), primary_key=True),
    sa.Column("queue_name", sa.String(100), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("counted_until", TZ),
    sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
)
