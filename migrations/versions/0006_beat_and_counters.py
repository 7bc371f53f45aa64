"""Periodic tasks with any number of beat processes, and counters for metrics.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

``job_schedules`` holds the state of ``celery beat``'s entries (``beat_schedule``,
synced in by :mod:`celery_pgqueue.beat`): whether an entry is enabled, when it last
sent a task and which. ``job_beat_leases`` holds one lease row per schedule: the beat
process named in it is the only one that sends, and ``fence`` grows each time another
process takes the lease over, so a deposed leader's send is refused by the database.

``job_counters`` keeps monotonic totals for Prometheus that outlive retention:
finished jobs per queue and status, folded in by maintenance, and lease rescues. Its
``mark`` row says up to when finished jobs have been counted; it starts at the
migration, so totals count from there.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TZ = sa.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "job_schedules",
        sa.Column("beat_name", sa.String(100), primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("task", sa.String(255), nullable=False),
        sa.Column("schedule", sa.String(255), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("last_run_at", TZ),
        sa.Column("total_run_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_job_id", UUID(as_uuid=True)),
        sa.Column("next_run_at", TZ),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "job_beat_leases",
        sa.Column("beat_name", sa.String(100), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("fence", sa.BigInteger, nullable=False),
        sa.Column("acquired_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("renewed_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", TZ, nullable=False),
    )
    op.create_table(
        "job_counters",
        sa.Column("counter", sa.String(50), primary_key=True),
        sa.Column("queue_name", sa.String(100), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("counted_until", TZ),
        sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
    )
    # Finished jobs are counted from the migration on (a Prometheus counter starts at 0).
    op.execute(
        "INSERT INTO job_counters (counter, queue_name, value, counted_until) "
        "VALUES ('mark', '', 0, now())"
    )


def downgrade() -> None:
    op.drop_table("job_counters")
    op.drop_table("job_beat_leases")
    op.drop_table("job_schedules")
