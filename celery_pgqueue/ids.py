"""Task ids -> ``jobs.id``.

``jobs.id`` is a uuid (the seed's type). Celery's ids are uuids unless a caller picks
its own (``apply_async(task_id="order-42")``); those map to a stable uuid5, so the
transport and the result backend always find the same row.
"""

from __future__ import annotations

import uuid

NAMESPACE = uuid.UUID("5b0f3c9e-6a53-4c1e-9d7e-9a1c6f3d2b10")


def job_id_for(task_id: str | uuid.UUID) -> uuid.UUID:
    """The ``jobs.id`` of a Celery task id."""
    if isinstance(task_id, uuid.UUID):
        return task_id
    try:
        return uuid.UUID(task_id)
    except (ValueError, AttributeError, TypeError):
        return uuid.uuid5(NAMESPACE, str(task_id))
