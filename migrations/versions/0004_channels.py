"""NOTIFY channel names kept in a table: unguessable, and short whatever the schema.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Any role that may connect to the database may LISTEN on any channel, and a small
result rides in its notification. The channels were named after the schema, so anyone
could name them (and a schema of 41 characters or more made them longer than
PostgreSQL's 63-byte identifiers). Each schema now gets two random names, drawn by
the server (``gen_random_uuid``, PostgreSQL 13+) when this migration runs, in a table
only the roles granted ``SELECT`` on it can read: the application's.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_channels",
        sa.Column("purpose", sa.String(20), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.CheckConstraint("purpose IN ('queues', 'results')", name="ck_job_channels_purpose"),
    )
    # 'pgqueue_', 32 hex digits (122 random bits) and a suffix that tells an operator
    # which is which: at most 48 bytes, a plain identifier.
    op.execute(
        "INSERT INTO job_channels (purpose, name)"
        " SELECT purpose, 'pgqueue_' || replace(gen_random_uuid()::text, '-', '') || suffix"
        " FROM (VALUES ('queues', ''), ('results', '_results')) AS wanted (purpose, suffix)"
    )


def downgrade() -> None:
    op.drop_table("job_channels")
