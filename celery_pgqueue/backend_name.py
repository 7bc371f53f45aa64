"""Tell whether an app's result backend is ours without importing it eagerly."""

from __future__ import annotations

from typing import Any


def is_pgqueue_backend(backend: Any) -> bool:
    """True for :class:`celery_pgqueue.backend.PgQueueBackend` (and subclasses)."""
    return any(cls.__module__ == "celery_pgqueue.backend" for cls in type(backend).__mro__)
