"""Frozen records passed between the store and the Celery glue.

Transport and backend see these, never SQLAlchemy rows, so the schema can change
behind the store without touching Celery code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to enqueue. ``priority=None`` takes the queue's ``default_priority``;
    ``run_at=None`` means now by the database's clock.

    ``delay_seconds`` (wins over ``run_at``) and ``ttl_seconds`` count from the
    database's clock at the statement that writes the row: a process whose own clock
    is off still gets the interval it meant (see the README's clock notes).

    ``unique_key`` (as stored: scoped and bounded, see :mod:`celery_pgqueue.unique`):
    the job is written only if no queued or running job holds that key
    (:meth:`~celery_pgqueue.store.broker.Broker.enqueue_unique`)."""

    id: UUID
    queue_name: str
    payload: Any
    priority: int | None = None
    run_at: datetime | None = None
    max_attempts: int | None = None
    ttl_seconds: float | None = None
    delay_seconds: float | None = None
    unique_key: str | None = None


def due_now(job: NewJob) -> bool:
    """Whether ``job`` is ready at once: no countdown or ETA still ahead of it."""
    return job.run_at is None and (job.delay_seconds is None or job.delay_seconds <= 0)


def one_job_params(job: NewJob, channel: str | None) -> dict[str, Any]:
    """The named parameters of a one-job enqueue (queries.ONE_NEW_JOB), plain or unique."""
    return {
        "id": job.id,
        "queue_name": job.queue_name,
        "payload": Jsonb(job.payload),
        "priority": job.priority,
        "run_at": job.run_at,
        "max_attempts": job.max_attempts,
        "ttl": job.ttl_seconds,
        "delay": job.delay_seconds,
        "channel": channel,
    }


@dataclass(frozen=True, slots=True)
class LiveJob:
    """The job that holds a unique key after a unique publish.

    ``id`` is the published job's own when it was written (or re-queued: the same
    task id again); else the holder's, with ``task_id`` its Celery task id as its
    message named it (a custom ``task_id`` maps to a uuid5 ``jobs.id``).
    """

    id: UUID
    task_id: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job a consumer now holds: ``attempt`` fences every later write to it."""

    id: UUID
    queue_name: str
    payload: Any
    priority: int
    attempt: int
    max_attempts: int | None
    expires_in: float | None = None
    """Seconds until the job expires by the database's clock (None: never)."""


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as operators and the result backend read it."""

    id: UUID
    queue_name: str
    status: str
    priority: int
    payload: Any
    attempt_count: int
    max_attempts: int | None
    run_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    last_error_message: str | None
    created_at: datetime
    updated_at: datetime
    result: Any
    lease_owner: str | None
    lease_expires_at: datetime | None
    acked_at: datetime | None
    expires_at: datetime | None = None
    unique_key: str | None = None
    """The key a unique publish gave it, as stored (see :mod:`celery_pgqueue.unique`)."""


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One ``job_logs`` row."""

    id: UUID
    job_id: UUID
    status: str
    log_message: str | None
    attempt_number: int
    started_at: datetime
    finished_at: datetime | None
    duration_seconds: float | None


@dataclass(frozen=True, slots=True)
class PruneCounts:
    """Rows removed (or, in a dry run, that would be) by one retention pass."""

    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    logs: int = 0


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One queue as ``pgqueue status`` shows it: the views ``job_queue_depth`` and
    ``job_queue_throughput`` joined. Ages are seconds; None when nothing qualifies."""

    name: str
    is_active: bool
    default_priority: int
    concurrency_limit: int | None
    """At most this many of its jobs run at once across all workers; None: no limit."""
    expires_at: datetime | None
    queued: int
    ready: int
    scheduled: int
    running: int
    completed: int
    failed: int
    cancelled: int
    oldest_ready_seconds: float | None
    longest_running_seconds: float | None
    expired_leases: int
    completed_5m: int
    failed_5m: int
    completed_1h: int
    failed_1h: int
    per_minute_5m: float
    per_minute_1h: float
    failure_rate_5m: float | None
    failure_rate_1h: float | None


@dataclass(frozen=True, slots=True)
class RunningJob:
    """One row of the ``job_running`` view: who holds the job and how long it has left."""

    id: UUID
    queue_name: str
    task: str | None
    attempt: int
    lease_owner: str | None
    started_at: datetime | None
    running_seconds: float | None
    lease_remaining_seconds: float | None
    lease_expired: bool
    acked: bool
