"""The tier's statuses and how Celery's task states map onto them."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """``jobs.status``: the five values the seed allows."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class LogStatus(StrEnum):
    """``job_logs.status``: one row per attempt, opened ``attempting`` and closed once."""

    ATTEMPTING = "attempting"
    SUCCESS = "success"
    RETRY = "retry"
    FAILED = "failed"


FINISHED = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)

EXPIRED_MESSAGE = "TaskRevokedError: expired"
"""``jobs.last_error_message`` of a task cancelled because its ``expires`` passed while it
waited: Celery's own reason for revoking it."""

# Celery state -> the job status it implies. States not listed (custom ones such as
# PROGRESS, and STARTED/RECEIVED) mean the job is running.
CELERY_TO_JOB: dict[str, JobStatus] = {
    "PENDING": JobStatus.QUEUED,
    "RETRY": JobStatus.QUEUED,
    "SUCCESS": JobStatus.COMPLETED,
    "FAILURE": JobStatus.FAILED,
    "REVOKED": JobStatus.CANCELLED,
    "REJECTED": JobStatus.FAILED,
    "IGNORED": JobStatus.COMPLETED,
}

# Celery state -> how the attempt's job_logs row is closed (None: still attempting).
CELERY_TO_LOG: dict[str, LogStatus] = {
    "SUCCESS": LogStatus.SUCCESS,
    "IGNORED": LogStatus.SUCCESS,
    "RETRY": LogStatus.RETRY,
    "FAILURE": LogStatus.FAILED,
    "REVOKED": LogStatus.FAILED,
    "REJECTED": LogStatus.FAILED,
}


def job_status_for(celery_state: str) -> JobStatus:
    """The ``jobs.status`` a Celery state implies; unknown/custom states are running."""
    return CELERY_TO_JOB.get(celery_state, JobStatus.RUNNING)
