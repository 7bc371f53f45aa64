"""Deleting jobs: retention of finished jobs, expired messages, purges, ``forget()``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa

from celery_pgqueue.states import JobStatus
from celery_pgqueue.store.expressions import (
    IS_EXPIRED,
    IS_QUEUED,
    IS_TASK,
    SECOND,
    fixed,
    status_literal,
)
from celery_pgqueue.store.tables import jobs


def purge(conn: sa.Connection, *, queue_name: str) -> int:
    """Delete a queue's waiting jobs (queued, due or scheduled); running jobs stay."""
    result = conn.execute(sa.delete(jobs).where(jobs.c.queue_name == queue_name, IS_QUEUED))
    return result.rowcount


def delete(conn: sa.Connection, *, job_ids: Sequence[UUID]) -> int:
    """Remove jobs and (by cascade) their logs: ``forget()``."""
    if not job_ids:
        return 0
    return conn.execute(sa.delete(jobs).where(jobs.c.id.in_(list(job_ids)))).rowcount


def prune_finished(
    conn: sa.Connection, *, status: JobStatus, older_than: float, limit: int, dry_run: bool
) -> int:
    """Delete up to ``limit`` finished jobs older than ``older_than`` seconds.

    Bounded per call so each transaction stays short; the caller loops. Maintenance
    runs this every few seconds, usually to find nothing, so it must stay an index
    probe under a generic plan: see :func:`_delete_jobs` and :func:`fixed`.
    """
    victims = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.status == status_literal(status),
            jobs.c.updated_at < sa.func.now() - fixed(older_than) * SECOND,
        )
        .limit(fixed(limit))
    )
    if dry_run:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(victims.subquery())).scalar_one()
        )
    return _delete_jobs(conn, victims)


def _delete_jobs(conn: sa.Connection, victims: sa.Select[Any]) -> int:
    """Delete the (locked, skipped if busy) rows ``victims`` selects; return how many.

    ``id = ANY(ARRAY(…))`` rather than a join: the ids are collected first, then each
    is one primary-key probe, whatever the planner guesses about their number (a
    join to a CTE can turn into a hash join over a scan of all of jobs).
    """
    chosen = sa.func.array(victims.with_for_update(skip_locked=True).scalar_subquery())
    deleted = sa.delete(jobs).where(jobs.c.id == sa.any_(chosen)).returning(jobs.c.id)
    return len(conn.execute(deleted).all())


def count_prunable(conn: sa.Connection, *, status: JobStatus, older_than: float) -> int:
    """How many jobs ``prune_finished`` would delete now, uncapped (a dry run's answer)."""
    return int(
        conn.execute(
            sa.select(sa.func.count()).where(
                jobs.c.status == status_literal(status),
                jobs.c.updated_at < sa.func.now() - fixed(older_than) * SECOND,
            )
        ).scalar_one()
    )


def is_prunable(*, completed_retention: float, failed_retention: float) -> sa.ColumnElement[bool]:
    """True for a job the next retention pass deletes (what ``prune_finished`` selects)."""

    def older(seconds: float) -> sa.ColumnElement[bool]:
        return jobs.c.updated_at < sa.func.now() - sa.literal(seconds) * SECOND

    return sa.or_(
        sa.and_(
            jobs.c.status.in_([JobStatus.COMPLETED.value, JobStatus.CANCELLED.value]),
            older(completed_retention),
        ),
        sa.and_(jobs.c.status == JobStatus.FAILED.value, older(failed_retention)),
    )


def drop_expired(conn: sa.Connection, *, limit: int) -> int:
    """Delete up to ``limit`` waiting messages whose TTL has passed.

    A TTL comes from the message (Kombu ``expiration``), its queue (``x-message-ttl``)
    or, for Celery's control replies and events only, the ``message_ttl`` option; a
    transient message nobody consumed in time is never delivered, so it is deleted
    rather than kept as history. Expired Celery tasks are recorded instead
    (:func:`expire_tasks`). ``ix_jobs_expiring`` holds only rows with a TTL: with none
    expired this is one probe.
    """
    return _delete_jobs(
        conn,
        sa.select(jobs.c.id).where(IS_EXPIRED, sa.not_(IS_TASK)).limit(fixed(limit)),
    )


def drop_waiting(conn: sa.Connection, *, queue_name: str, limit: int) -> int:
    """Delete up to ``limit`` waiting messages of one queue (its expiry has passed).

    As in RabbitMQ, an expired queue goes with its messages: nobody consumes it any
    more (consumers keep pushing ``expires_at`` forward), so they would wait forever
    and keep the queue row alive through the foreign key. Ordered as the claim reads
    them, so even a generic plan walks ``ix_jobs_ready`` for this one queue.
    """
    return _delete_jobs(
        conn,
        sa.select(jobs.c.id)
        .where(jobs.c.queue_name == queue_name, IS_QUEUED)
        .order_by(jobs.c.priority, jobs.c.run_at, jobs.c.created_at)
        .limit(fixed(limit)),
    )
