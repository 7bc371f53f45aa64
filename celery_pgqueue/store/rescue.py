"""Taking jobs back or out of line: lease rescue, cancel, retry, expiry of tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import UUID as PG_UUID

from celery_pgqueue.states import EXPIRED_MESSAGE, JobStatus, LogStatus
from celery_pgqueue.store.expressions import (
    IS_EXPIRED,
    IS_QUEUED,
    IS_RUNNING,
    IS_TASK,
    announce,
    close_attempts,
    fixed,
    ids_param,
    notify_queues,
    status_literal,
)
from celery_pgqueue.store.tables import job_logs, jobs

# Running rows without any lease taken back per rescue pass (see rescue_expired).
UNLEASED_PER_PASS = 10


def rescue_expired(
    conn: sa.Connection,
    *,
    limit: int,
    channel: str | None,
    result_channel: str | None = None,
    spare: tuple[str, Sequence[UUID]] | None = None,
) -> tuple[int, int]:
    """Take back running jobs whose lease ran out (their worker died or hung).

    Not yet acked (``acks_late``, or prefetched and never started): back to ``queued``
    for another attempt, unless ``max_attempts`` is spent. Acked early: the task may
    have run, so it is marked failed rather than run twice. Returns (requeued, failed).

    A running row the transport made (it has a payload) with no lease at all was
    edited by hand: no heartbeat will ever extend it, so it counts as expired rather
    than staying ``running`` forever. Rows the result backend made for another broker
    have no payload and no lease, and are left alone.

    ``spare``: ``(owner, job ids)`` the calling process still holds (its lease keeper
    renews them). Its own pass never takes those back, however late their renewal
    after a stall of the process; another process's pass still does.
    """
    # Two lookups, each an index condition on ix_jobs_lease (an OR of them would be
    # a filter over every running row). Unleased rows are rare (hand edits): a few per
    # pass, as a literal LIMIT, so the planner does not expect thousands (its guess
    # for IS NULL comes from every row of jobs) and keeps to index probes.
    lapsed_lease = [IS_RUNNING, jobs.c.lease_expires_at < sa.func.now()]
    if spare is not None and spare[1]:
        owner, held = spare
        lapsed_lease.append(
            sa.or_(
                jobs.c.lease_owner.is_distinct_from(owner),
                jobs.c.id != sa.all_(sa.literal(list(held), ARRAY(PG_UUID(as_uuid=True)))),
            )
        )
    expired = (
        sa.select(jobs.c.id)
        .where(*lapsed_lease)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("expired")
    )
    unleased = (
        sa.select(jobs.c.id)
        .where(IS_RUNNING, jobs.c.lease_expires_at.is_(None), jobs.c.payload.is_not(None))
        .limit(fixed(UNLEASED_PER_PASS))
        .with_for_update(skip_locked=True)
        .cte("unleased")
    )
    lapsed = sa.union_all(sa.select(expired.c.id), sa.select(unleased.c.id)).cte("lapsed")
    exhausted = sa.and_(
        jobs.c.max_attempts.is_not(None), jobs.c.attempt_count >= jobs.c.max_attempts
    )
    to_fail = sa.or_(jobs.c.acked_at.is_not(None), exhausted)
    updated = (
        sa.update(jobs)
        .where(jobs.c.id == lapsed.c.id)
        .values(
            status=sa.case((to_fail, JobStatus.FAILED.value), else_=JobStatus.QUEUED.value),
            failed_at=sa.case((to_fail, sa.func.now()), else_=None),
            last_error_message=sa.case(
                (
                    jobs.c.acked_at.is_not(None),
                    sa.literal("WorkerLostError: worker lost while running the task (")
                    + sa.func.coalesce(jobs.c.lease_owner, "?")
                    + ")",
                ),
                (exhausted, sa.literal("WorkerLostError: max_attempts reached after worker loss")),
                else_=jobs.c.last_error_message,
            ),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=sa.func.now(),
        )
        .returning(jobs.c.id, jobs.c.attempt_count, jobs.c.status, jobs.c.queue_name)
        .cte("updated")
    )
    closed = close_attempts(
        updated,
        sa.case(
            (updated.c.status == JobStatus.FAILED.value, LogStatus.FAILED.value),
            else_=LogStatus.RETRY.value,
        ),
        "worker lost (lease expired)",
    )
    requeued = sa.func.count().filter(updated.c.status == JobStatus.QUEUED.value)
    failed = sa.func.count().filter(updated.c.status == JobStatus.FAILED.value)
    back = sa.select(updated.c.queue_name).where(updated.c.status == JobStatus.QUEUED.value)
    lost = sa.select(updated.c.id).where(updated.c.status == JobStatus.FAILED.value).cte("lost")
    row = conn.execute(
        sa.select(
            requeued,
            failed,
            notify_queues(back.cte("back"), channel is not None),
            announce(lost, result_channel),
        )
        .select_from(updated)
        .add_cte(closed),
        {"p_channel": channel},
    ).first()
    return (int(row[0]), int(row[1])) if row else (0, 0)


#: ``last_error_message`` of a job cancelled by Celery's ``revoke()``: workers remember
#: the id, so a retry must refuse it (see :func:`cancel_reasons`).
REVOKED_MESSAGE = "TaskRevokedError: revoked"


def cancel(
    conn: sa.Connection,
    *,
    job_ids: Sequence[UUID],
    result_channel: str | None = None,
    reason: str | None = None,
) -> int:
    """Cancel jobs that have not started: durable, no worker will ever claim them.

    Clients already waiting in ``get()`` are woken (``result_channel``); ``reason``
    becomes the job's ``last_error_message``.
    """
    if not job_ids:
        return 0
    values: dict[str, Any] = {"status": JobStatus.CANCELLED.value, "updated_at": sa.func.now()}
    if reason is not None:
        values["last_error_message"] = reason
    cancelled = (
        sa.update(jobs)
        .where(jobs.c.id.in_(list(job_ids)), IS_QUEUED)
        .values(**values)
        .returning(jobs.c.id)
        .cte("cancelled")
    )
    row = conn.execute(
        sa.select(sa.func.count(), announce(cancelled, result_channel)).select_from(cancelled)
    ).first()
    return int(row[0]) if row else 0


def retry(conn: sa.Connection, *, job_ids: Sequence[UUID], channel: str | None) -> int:
    """A failed or cancelled job back to ``queued`` now; its attempt history stays.

    It runs without its unique key: the key was freed when the job finished, and a
    newer job may hold it (as when ENQUEUE re-queues a finished task id).
    """
    if not job_ids:
        return 0
    moved = (
        sa.update(jobs)
        .where(
            jobs.c.id.in_(list(job_ids)),
            jobs.c.status.in_([JobStatus.FAILED.value, JobStatus.CANCELLED.value]),
            jobs.c.payload.is_not(None),
        )
        .values(
            status=JobStatus.QUEUED.value,
            run_at=sa.func.now(),
            failed_at=None,
            result=None,
            lease_owner=None,
            lease_expires_at=None,
            acked_at=None,
            unique_key=None,
            updated_at=sa.func.now(),
        )
        .returning(jobs.c.queue_name)
        .cte("moved")
    )
    row = conn.execute(
        sa.select(sa.func.count(), notify_queues(moved, channel is not None)).select_from(moved),
        {"p_channel": channel},
    ).first()
    return int(row[0]) if row else 0


def cancel_reasons(
    conn: sa.Connection, *, job_ids: Sequence[UUID]
) -> list[tuple[UUID, str | None, str | None]]:
    """Of these jobs, the cancelled ones: id, ``last_error_message``, last log message.

    Together they tell a job Celery revoked or expired (which workers remember by id)
    from one an operator cancelled.
    """
    if not job_ids:
        return []
    last_log = (
        sa.select(job_logs.c.log_message)
        .where(job_logs.c.job_id == jobs.c.id)
        .order_by(job_logs.c.attempt_number.desc(), job_logs.c.started_at.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = conn.execute(
        sa.select(jobs.c.id, jobs.c.last_error_message, last_log).where(
            jobs.c.id.in_(list(job_ids)), jobs.c.status == status_literal(JobStatus.CANCELLED)
        )
    ).all()
    return [(row[0], row[1], row[2]) for row in rows]


def expire_tasks(
    conn: sa.Connection,
    *,
    limit: int,
    job_ids: Sequence[UUID] | None = None,
    result_channel: str | None = None,
) -> int:
    """Cancel up to ``limit`` tasks still queued past their ``expires``; how many.

    Celery ends such a task REVOKED ("expired"), so the row stays, ``cancelled``, under
    the normal retention, with a log row saying why (as an attempt that never started,
    like a worker's drop on delivery). ``job_ids`` limits it to those jobs (a client
    waiting on them). Waiting ``get()`` calls are woken (``result_channel``).
    """
    victims = sa.select(jobs.c.id).where(IS_EXPIRED, IS_TASK)
    if job_ids is not None:
        victims = victims.where(jobs.c.id == sa.any_(ids_param()))
    chosen = victims.limit(fixed(limit)).with_for_update(skip_locked=True).cte("chosen")
    expired = (
        sa.update(jobs)
        .where(jobs.c.id == chosen.c.id)
        .values(
            status=JobStatus.CANCELLED.value,
            attempt_count=jobs.c.attempt_count + 1,
            last_error_message=EXPIRED_MESSAGE,
            updated_at=sa.func.now(),
        )
        .returning(jobs.c.id, jobs.c.attempt_count, jobs.c.expires_at)
        .cte("expired")
    )
    logged = (
        sa.insert(job_logs)
        .from_select(
            [
                "job_id",
                "attempt_number",
                "status",
                "started_at",
                "finished_at",
                "duration",
                "log_message",
            ],
            sa.select(
                expired.c.id,
                expired.c.attempt_count,
                sa.literal(LogStatus.FAILED.value),
                sa.func.now(),
                sa.func.now(),
                sa.text("interval '0'"),
                sa.literal("expired: not started before its expires time (")
                + sa.cast(expired.c.expires_at, sa.Text)
                + ")",
            ),
        )
        .cte("logged")
    )
    row = conn.execute(
        sa.select(sa.func.count(), announce(expired, result_channel))
        .select_from(expired)
        .add_cte(logged),
        {"p_ids": list(job_ids or ())},
    ).first()
    return int(row[0]) if row else 0


def seconds_to_expiry(conn: sa.Connection, *, job_ids: Sequence[UUID]) -> dict[UUID, float]:
    """Seconds until each still-queued task of ``job_ids`` expires (negative: past).

    Only jobs that can expire are present. By the database's clock, relative, so a
    caller can wait for it on its own monotonic clock.
    """
    if not job_ids:
        return {}
    rows = conn.execute(
        sa.select(
            jobs.c.id,
            sa.cast(sa.extract("epoch", jobs.c.expires_at - sa.func.now()), sa.Float),
        ).where(
            jobs.c.id == sa.any_(ids_param()),
            IS_QUEUED,
            jobs.c.expires_at.is_not(None),
            IS_TASK,
        ),
        {"p_ids": list(job_ids)},
    ).all()
    return {row[0]: float(row[1]) for row in rows}
