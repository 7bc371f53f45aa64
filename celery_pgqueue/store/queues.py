"""Statements on ``job_queues``: create on first use, pause, resume, priority, limit."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from celery_pgqueue.store.tables import job_queues, jobs


def ensure(conn: sa.Connection, *, names: Sequence[str], default_priority: int) -> None:
    """Create queues that do not exist yet; an existing queue keeps its settings."""
    if not names:
        return
    conn.execute(
        pg_insert(job_queues)
        .values([{"name": n, "default_priority": default_priority} for n in sorted(set(names))])
        .on_conflict_do_nothing(index_elements=["name"])
    )


def set_active(conn: sa.Connection, *, name: str, active: bool) -> bool:
    """Pause (False) or resume (True) a queue; False when no such queue exists."""
    result = conn.execute(
        sa.update(job_queues).where(job_queues.c.name == name).values(is_active=active)
    )
    return result.rowcount > 0


def set_default_priority(conn: sa.Connection, *, name: str, priority: int) -> bool:
    """Change the priority given to this queue's jobs that name none."""
    result = conn.execute(
        sa.update(job_queues).where(job_queues.c.name == name).values(default_priority=priority)
    )
    return result.rowcount > 0


def set_concurrency_limit(conn: sa.Connection, *, name: str, limit: int | None) -> bool:
    """Let at most ``limit`` of this queue's jobs run at once (None: no limit).

    Claims of the queue read the limit under the queue row's lock
    (:data:`~celery_pgqueue.store.queries.CLAIM_LIMITED`), so a change applies to the
    next claim of every worker. False when no such queue exists.
    """
    result = conn.execute(
        sa.update(job_queues).where(job_queues.c.name == name).values(concurrency_limit=limit)
    )
    return result.rowcount > 0


def set_message_ttl(conn: sa.Connection, *, name: str, seconds: float | None) -> bool:
    """Record a queue's ``x-message-ttl``; False if unchanged (no write) or no such queue."""
    result = conn.execute(
        sa.update(job_queues)
        .where(job_queues.c.name == name, job_queues.c.message_ttl.is_distinct_from(seconds))
        .values(message_ttl=seconds)
    )
    return result.rowcount > 0


def get(conn: sa.Connection, *, name: str) -> sa.RowMapping | None:
    """One queue's settings."""
    return conn.execute(sa.select(job_queues).where(job_queues.c.name == name)).mappings().first()


def list_all(conn: sa.Connection) -> list[sa.RowMapping]:
    """Every queue, by name."""
    return list(
        conn.execute(
            sa.select(
                job_queues.c.name,
                job_queues.c.default_priority,
                job_queues.c.is_active,
                job_queues.c.concurrency_limit,
                job_queues.c.created_at,
            ).order_by(job_queues.c.name)
        ).mappings()
    )


def names(conn: sa.Connection) -> list[str]:
    """Names of the queues work is sent to, by name (no expiring mailboxes or replies)."""
    return list(
        conn.scalars(
            sa.select(job_queues.c.name)
            .where(job_queues.c.expires_at.is_(None))
            .order_by(job_queues.c.name)
        )
    )


def active_among(conn: sa.Connection, *, names: Sequence[str]) -> list[str]:
    """Which of ``names`` exist and are not paused."""
    return list(
        conn.execute(
            sa.select(job_queues.c.name).where(
                job_queues.c.name.in_(list(names)), job_queues.c.is_active
            )
        ).scalars()
    )


def expired(conn: sa.Connection, *, limit: int) -> list[str]:
    """Up to ``limit`` queues past their ``x-expires`` (``job_queues`` is small)."""
    return list(
        conn.execute(
            sa.select(job_queues.c.name)
            .where(job_queues.c.expires_at < sa.func.now())
            .order_by(job_queues.c.expires_at)
            .limit(limit)
        ).scalars()
    )


def drop_expired(conn: sa.Connection, *, limit: int) -> list[str]:
    """Delete up to ``limit`` queues past their ``x-expires`` that no job references,
    returning their names.

    Their bindings go by cascade. ``SKIP LOCKED`` passes over a queue a producer is
    publishing to right now (its foreign-key check holds a lock on the row), so a
    late message keeps its queue instead of failing.
    """
    referenced = sa.exists().where(jobs.c.queue_name == job_queues.c.name)
    expired = (
        sa.select(job_queues.c.name)
        .where(job_queues.c.expires_at < sa.func.now(), ~referenced)
        .limit(limit)
        .with_for_update(of=job_queues, skip_locked=True)
        .cte("expired")
    )
    deleted = (
        sa.delete(job_queues)
        .where(job_queues.c.name == expired.c.name)
        .returning(job_queues.c.name)
        .cte("deleted")
    )
    return list(conn.execute(sa.select(deleted.c.name)).scalars())
