"""The Queue/Jobs tier: job_queues, jobs, job_logs, plus the columns Celery needs.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import INTERVAL, JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "job_queues",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("default_priority", sa.Integer, nullable=False, server_default="100"),
        sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", TZ),
    )
    op.create_table(
        "jobs",
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
        sa.Column("created_at", TZ, nullable=False, server_default=sa.func.clock_timestamp()),
        sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("result", JSONB),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_expires_at", TZ),
        sa.Column("acked_at", TZ),
        sa.Column("expires_at", TZ),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'completed', 'failed', 'cancelled')",
            name="ck_jobs_status",
        ),
    )
    op.create_index(
        "ix_jobs_ready",
        "jobs",
        ["queue_name", "priority", "run_at", "created_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "ix_jobs_lease",
        "jobs",
        ["lease_expires_at"],
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_index(
        "ix_jobs_finished",
        "jobs",
        ["status", "updated_at"],
        postgresql_where=sa.text("status IN ('completed', 'failed', 'cancelled')"),
    )
    # jobs is the hot table: every task is an insert and two or three updates. Vacuum after
    # 1% churn (not the default 20%) so dead tuples from claims are reclaimed within
    # seconds at thousands of tasks/s; fillfactor 80 leaves room on each page so
    # lease/heartbeat updates can stay on-page.
    op.execute(
        "ALTER TABLE jobs SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01, "
        "autovacuum_vacuum_threshold = 1000, autovacuum_analyze_scale_factor = 0.02, "
        "autovacuum_vacuum_cost_limit = 2000)"
    )
    op.create_table(
        "job_logs",
        sa.Column(
            "id", UUID(as_uuid=True), primary_key=True, server_default=sa.func.gen_random_uuid()
        ),
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
    op.create_index("ix_job_logs_job_id", "job_logs", ["job_id", "attempt_number"])
    op.create_index("ix_job_logs_started_at", "job_logs", ["started_at"])
    op.create_table(
        "job_bindings",
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
            "exchange_type IN ('direct', 'topic', 'fanout')",
            name="ck_job_bindings_exchange_type",
        ),
    )
    op.create_index("ix_job_bindings_queue_name", "job_bindings", ["queue_name"])


def downgrade() -> None:
    op.drop_table("job_bindings")
    op.drop_table("job_logs")
    op.drop_table("jobs")
    op.drop_table("job_queues")
