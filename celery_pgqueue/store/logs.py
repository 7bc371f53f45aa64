"""Statements on ``job_logs``: one row per attempt, bounded by retention."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import sqlalchemy as sa

from celery_pgqueue.store.expressions import SECOND, fixed
from celery_pgqueue.store.tables import job_logs, jobs


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
            job_logs.c.started_at < sa.func.now() - fixed(older_than) * SECOND,
        )
        .limit(fixed(limit))
    )
    return _delete(conn, victims, dry_run)


def prune_excess(conn: sa.Connection, *, keep: int, limit: int, dry_run: bool) -> int:
    """Delete the oldest attempts of jobs with more than ``keep`` log rows.

    A job gets one log row per claim, numbered 1..``attempt_count``, so only a job
    claimed more than ``keep`` times can exceed the cap, and its excess is every
    attempt numbered ``attempt_count - keep`` or lower. Those jobs are found through
    ``ix_jobs_retried`` (``attempt_count > 1``): maintenance runs this every few
    seconds, and on a healthy queue it touches no rows at all instead of ranking
    every log row.
    """
    victims = (
        sa.select(job_logs.c.id)
        .join(jobs, jobs.c.id == job_logs.c.job_id)
        .where(*_over_cap(keep))
        .limit(fixed(limit))
    )
    return _delete(conn, victims, dry_run)


def _over_cap(keep: int) -> tuple[sa.ColumnElement[bool], ...]:
    # keep goes into the SQL text so the planner can prove ix_jobs_retried's predicate.
    cap = sa.literal(keep, literal_execute=True)
    return (
        jobs.c.attempt_count > sa.literal(1, literal_execute=True),
        jobs.c.attempt_count > cap,
        job_logs.c.attempt_number <= jobs.c.attempt_count - cap,
    )


def count_prunable(
    conn: sa.Connection, *, older_than: float, keep: int, doomed_jobs: sa.ColumnElement[bool]
) -> int:
    """Log rows the next prune would delete itself, uncapped (a dry run's answer).

    Rows of jobs that prune deletes anyway (``doomed_jobs``) go by cascade and are not
    counted, and a row both old and over the cap counts once, as in a real pass.
    """
    old = sa.and_(
        job_logs.c.finished_at.is_not(None),
        job_logs.c.started_at < sa.func.now() - fixed(older_than) * SECOND,
    )
    return int(
        conn.execute(
            sa.select(sa.func.count())
            .select_from(job_logs.join(jobs, jobs.c.id == job_logs.c.job_id))
            .where(~doomed_jobs, sa.or_(old, sa.and_(*_over_cap(keep))))
        ).scalar_one()
    )


def _delete(conn: sa.Connection, victims: sa.Select[Any], dry_run: bool) -> int:
    if dry_run:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(victims.subquery())).scalar_one()
        )
    # As retention.py deletes jobs: ids first, then one primary-key probe each.
    chosen = sa.func.array(victims.with_for_update(of=job_logs, skip_locked=True).scalar_subquery())
    deleted = sa.delete(job_logs).where(job_logs.c.id == sa.any_(chosen)).returning(job_logs.c.id)
    return len(conn.execute(deleted).all())
