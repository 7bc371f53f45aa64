"""Statements on ``job_bindings`` and queue expiry: routing shared by every process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from celery_pgqueue.store.expressions import SECOND
from celery_pgqueue.store.tables import job_bindings, job_queues, jobs


def bind(
    conn: sa.Connection, *, exchange: str, exchange_type: str, routing_key: str, queue_name: str
) -> None:
    """Record a binding; declaring it again changes nothing."""
    conn.execute(
        pg_insert(job_bindings)
        .values(
            exchange=exchange,
            exchange_type=exchange_type,
            routing_key=routing_key,
            queue_name=queue_name,
        )
        .on_conflict_do_nothing()
    )


def unbind(conn: sa.Connection, *, exchange: str, routing_key: str, queue_name: str) -> None:
    """Forget one binding."""
    conn.execute(
        sa.delete(job_bindings).where(
            job_bindings.c.exchange == exchange,
            job_bindings.c.routing_key == routing_key,
            job_bindings.c.queue_name == queue_name,
        )
    )


def table(conn: sa.Connection, *, exchange: str) -> list[sa.Row[Any]]:
    """``(exchange_type, routing_key, queue_name)`` of every binding of an exchange."""
    return list(
        conn.execute(
            sa.select(
                job_bindings.c.exchange_type, job_bindings.c.routing_key, job_bindings.c.queue_name
            )
            .where(job_bindings.c.exchange == exchange)
            .order_by(job_bindings.c.queue_name, job_bindings.c.routing_key)
        )
    )


def touch_queues(conn: sa.Connection, *, expiries: Sequence[tuple[str, float]]) -> None:
    """Push back the expiry of queues still in use (Kombu's ``x-expires``)."""
    for name, seconds in expiries:
        conn.execute(
            sa.update(job_queues)
            .where(job_queues.c.name == name)
            .values(expires_at=sa.func.now() + sa.literal(seconds) * SECOND)
        )


def delete_queue(conn: sa.Connection, *, name: str) -> bool:
    """Drop a queue with its waiting messages and bindings (Kombu ``queue_delete``)."""
    conn.execute(sa.delete(jobs).where(jobs.c.queue_name == name, jobs.c.status == "queued"))
    still_used = sa.exists().where(jobs.c.queue_name == name)
    result = conn.execute(sa.delete(job_queues).where(job_queues.c.name == name, ~still_used))
    return result.rowcount > 0


def queue_exists(conn: sa.Connection, *, name: str) -> bool:
    """Whether a queue has been declared."""
    return bool(conn.execute(sa.select(sa.exists().where(job_queues.c.name == name))).scalar_one())
