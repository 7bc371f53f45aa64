"""Reads of the operator views (migration 0003): queue depth, throughput, running jobs.

The views are the SQL answer to an operator's questions, for ``psql`` and dashboards;
``pgqueue status`` reads the same views so the CLI and a Grafana panel never disagree.
They are declared here on a metadata of their own: they are not tables, and the test
that compares the migrated schema with ``tables.metadata`` must not see them.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import INTERVAL, UUID

from celery_pgqueue.store.tables import TZ, job_queues

metadata = sa.MetaData()

job_queue_depth = sa.Table(
    "job_queue_depth",
    metadata,
    sa.Column("queue_name", sa.String),
    sa.Column("is_active", sa.Boolean),
    sa.Column("default_priority", sa.Integer),
    sa.Column("expires_at", TZ),
    sa.Column("queued", sa.BigInteger),
    sa.Column("ready", sa.BigInteger),
    sa.Column("scheduled", sa.BigInteger),
    sa.Column("running", sa.BigInteger),
    sa.Column("completed", sa.BigInteger),
    sa.Column("failed", sa.BigInteger),
    sa.Column("cancelled", sa.BigInteger),
    sa.Column("oldest_ready_at", TZ),
    sa.Column("oldest_ready_age", INTERVAL),
    sa.Column("longest_running", INTERVAL),
    sa.Column("expired_leases", sa.BigInteger),
)

job_queue_throughput = sa.Table(
    "job_queue_throughput",
    metadata,
    sa.Column("queue_name", sa.String),
    sa.Column("completed_5m", sa.BigInteger),
    sa.Column("failed_5m", sa.BigInteger),
    sa.Column("completed_1h", sa.BigInteger),
    sa.Column("failed_1h", sa.BigInteger),
    sa.Column("per_minute_5m", sa.Numeric(asdecimal=False)),
    sa.Column("per_minute_1h", sa.Numeric(asdecimal=False)),
    sa.Column("failure_rate_5m", sa.Numeric(asdecimal=False)),
    sa.Column("failure_rate_1h", sa.Numeric(asdecimal=False)),
)

job_running = sa.Table(
    "job_running",
    metadata,
    sa.Column("id", UUID(as_uuid=True)),
    sa.Column("queue_name", sa.String),
    sa.Column("task", sa.String),
    sa.Column("attempt", sa.Integer),
    sa.Column("lease_owner", sa.String),
    sa.Column("started_at", TZ),
    sa.Column("running_for", INTERVAL),
    sa.Column("lease_expires_at", TZ),
    sa.Column("lease_remaining", INTERVAL),
    sa.Column("lease_expired", sa.Boolean),
    sa.Column("acked", sa.Boolean),
)


def _seconds(interval: sa.ColumnElement[Any], name: str) -> sa.Label[Any]:
    return sa.cast(sa.extract("epoch", interval), sa.Float).label(name)


def queue_status(conn: sa.Connection, *, include_transient: bool) -> list[sa.RowMapping]:
    """Depth joined with throughput (and the queue's limit), one row per queue, by name.

    Queues with an expiry (remote-control mailboxes, event receivers, reply queues)
    are Celery's plumbing, not work: left out unless ``include_transient``.
    """
    d, t = job_queue_depth, job_queue_throughput
    stmt = (
        sa.select(
            d.c.queue_name.label("name"),
            d.c.is_active,
            d.c.default_priority,
            job_queues.c.concurrency_limit,
            d.c.expires_at,
            d.c.queued,
            d.c.ready,
            d.c.scheduled,
            d.c.running,
            d.c.completed,
            d.c.failed,
            d.c.cancelled,
            _seconds(d.c.oldest_ready_age, "oldest_ready_seconds"),
            _seconds(d.c.longest_running, "longest_running_seconds"),
            d.c.expired_leases,
            t.c.completed_5m,
            t.c.failed_5m,
            t.c.completed_1h,
            t.c.failed_1h,
            t.c.per_minute_5m,
            t.c.per_minute_1h,
            t.c.failure_rate_5m,
            t.c.failure_rate_1h,
        )
        .select_from(
            d.join(t, t.c.queue_name == d.c.queue_name).join(
                job_queues, job_queues.c.name == d.c.queue_name
            )
        )
        .order_by(d.c.queue_name)
    )
    if not include_transient:
        stmt = stmt.where(d.c.expires_at.is_(None))
    return list(conn.execute(stmt).mappings())


def running(conn: sa.Connection, *, limit: int) -> list[sa.RowMapping]:
    """Running jobs, longest running first."""
    r = job_running
    return list(
        conn.execute(
            sa.select(
                r.c.id,
                r.c.queue_name,
                r.c.task,
                r.c.attempt,
                r.c.lease_owner,
                r.c.started_at,
                _seconds(r.c.running_for, "running_seconds"),
                _seconds(r.c.lease_remaining, "lease_remaining_seconds"),
                r.c.lease_expired,
                r.c.acked,
            )
            .order_by(r.c.started_at, r.c.id)
            .limit(limit)
        ).mappings()
    )
