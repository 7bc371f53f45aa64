"""Groups and native chords for the result backend: job_groups, job_chord_parts.

A saved GroupResult, and the counter that starts a chord's body exactly once when its
last header task finishes (no ``celery.chord_unlock`` polling task).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "job_groups",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("result", JSONB),
        sa.Column("chord_size", sa.Integer),
        sa.Column("chord_added", sa.Integer, nullable=False, server_default="0"),
        sa.Column("chord_done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("chord_started_at", TZ),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_job_groups_updated_at", "job_groups", ["updated_at"])
    op.create_table(
        "job_chord_parts",
        sa.Column(
            "group_id",
            UUID(as_uuid=True),
            sa.ForeignKey("job_groups.id", ondelete="CASCADE", name="fk_job_chord_parts_group_id"),
            primary_key=True,
        ),
        sa.Column("task_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("group_index", sa.Integer, primary_key=True),
        sa.Column("state", sa.String(50), nullable=False),
        sa.Column("counted_at", TZ, nullable=False, server_default=sa.func.clock_timestamp()),
    )


def downgrade() -> None:
    op.drop_table("job_chord_parts")
    op.drop_table("job_groups")
