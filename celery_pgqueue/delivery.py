"""What the pgqueue transport stamps on each delivery's properties, read where tasks run.

The transport writes them when it delivers a claimed row; the result backend and
:mod:`celery_pgqueue.finalize` read them to fence their writes by the delivery's
attempt, so a worker that lost its lease cannot overwrite its successor's outcome.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from celery_pgqueue.ids import job_id_for

ATTEMPT = "pgqueue_attempt"
"""This delivery's attempt number: every write to its row is fenced by it."""
JOB = "pgqueue_job"
"""The delivered row's id: a task sent to several queues (broadcast) has one per queue."""
DEFAULT_PRIORITY = "pgqueue_default_priority"
"""Present when the task was sent without a priority and its queue's default applied."""


def attempt_of(properties: Any) -> int | None:
    """The attempt number on a delivery's properties; None when pgqueue did not deliver it."""
    attempt = properties.get(ATTEMPT) if isinstance(properties, Mapping) else None
    return int(attempt) if attempt is not None else None


def job_of(properties: Any, task_id: str) -> UUID:
    """The delivered row's id, else the row the task id maps to."""
    job = properties.get(JOB) if isinstance(properties, Mapping) else None
    return UUID(job) if job else job_id_for(task_id)
