"""Statements on ``job_logs``: one row per attempt, bounded by retention."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import sqlalchemy as sa

from celery_pgqueue.store.tables import job_logs

SECOND = sa.text("interval '1 second'")


def for_job(conn: sa.Connection, *, job_id: UUID) -> list[sa.Row[Any]]:
    """A job's attempts, oldest first."""
    return list(
        conn.execute(
            sa.select(
                job_logs.c.id,
                job_logs.c.job_id,
                job_logs.c.status,
                job_logs.c.log_message,
                job_logs.c.attempt_number,
                job_logs.c.started_at,
                job_logs.c.finished_at,
                sa.extract("epoch", job_logs.c.duration),
            )
            .where(job_logs.c.job_id == job_id)
            .order_by(job_logs.c.attempt_number, job_logs.c.started_at)
        )
    )


def prune_old(conn: sa.Connection, *, older_than: float, limit: int, dry_run: bool) -> int:
    """Delete up to ``limit`` finished log rows older than ``older_than`` seconds."""
    victims = (
        sa.select(job_logs.c.id)
        .where(
            job_logs.c.finished_at.is_not(None),
            job_logs.c.started_at < sa.func.now() - sa.literal(older_than) * SECOND,
        )
        .limit(limit)
    )
    return _delete(conn, victims, dry_run)


def prune_excess(conn: sa.Connection, *, keep: int, limit: int, dry_run: bool) -> int:
    """Delete the oldest attempts of jobs with more than ``keep`` log rows."""
    ranked = sa.select(
        job_logs.c.id,
        sa.func.row_number()
        .over(
            partition_by=job_logs.c.job_id,
            order_by=(job_logs.c.attempt_number.desc(), job_logs.c.started_at.desc()),
        )
        .label("rank"),
    ).subquery("ranked")
    victims = sa.select(ranked.c.id).where(ranked.c.rank > keep).limit(limit)
    return _delete(conn, victims, dry_run)


def _delete(conn: sa.Connection, victims: sa.Select[Any], dry_run: bool) -> int:
    if dry_run:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(victims.subquery())).scalar_one()
        )
    chosen = victims.cte("victims")
    deleted = (
        sa.delete(job_logs).where(job_logs.c.id == chosen.c.id).returning(job_logs.c.id)
    ).cte("deleted")
    return int(conn.execute(sa.select(sa.func.count()).select_from(deleted)).scalar_one())
