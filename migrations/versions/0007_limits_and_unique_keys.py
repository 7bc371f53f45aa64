"""Global concurrency limits per queue, and unique tasks.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

``job_queues.concurrency_limit``: at most this many jobs of the queue run at once,
across every worker (``celery pgqueue set-limit``); None, the default, is no limit.
``ix_jobs_running``: the claim of a limited queue counts its running jobs through it.

``jobs.unique_key``: a publish with a unique key queues at most one live job per key
and task name. The partial unique index covers only queued and running rows, so the
database refuses a second live job (racing producers included) and a finished job
frees its key.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("job_queues", sa.Column("concurrency_limit", sa.Integer))
    op.create_check_constraint(
        "ck_job_queues_concurrency_limit",
        "job_queues",
        "concurrency_limit IS NULL OR concurrency_limit >= 0",
    )
    # The limit's count of a queue's running jobs (each limited claim, and each finish
    # in a limited queue): small, as only running rows are in it.
    op.create_index(
        "ix_jobs_running",
        "jobs",
        ["queue_name"],
        postgresql_where=sa.text("status = 'running'"),
    )
    op.add_column("jobs", sa.Column("unique_key", sa.String(255)))
    op.create_index(
        "ux_jobs_unique_key_live",
        "jobs",
        ["unique_key"],
        unique=True,
        postgresql_where=sa.text("unique_key IS NOT NULL AND status IN ('queued', 'running')"),
    )


def downgrade() -> None:
    op.drop_index("ux_jobs_unique_key_live", table_name="jobs")
    op.drop_column("jobs", "unique_key")
    op.drop_index("ix_jobs_running", table_name="jobs")
    op.drop_constraint("ck_job_queues_concurrency_limit", "job_queues", type_="check")
    op.drop_column("job_queues", "concurrency_limit")
