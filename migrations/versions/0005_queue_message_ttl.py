"""Queue-level message TTL: ``job_queues.message_ttl`` (Kombu's ``x-message-ttl``).

A queue declared with ``x-message-ttl`` (``Queue(..., message_ttl=…)``) drops what
waits in it longer than that, whoever publishes: the publisher is often another
process that never declared the queue (a reply to a request, say), so the setting
lives with the queue's row and the insert applies it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("job_queues", sa.Column("message_ttl", sa.Float))


def downgrade() -> None:
    op.drop_column("job_queues", "message_ttl")
