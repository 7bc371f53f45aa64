"""Python API for operators: pause, resume, reprioritise, cancel.

Each function takes a Celery app (its broker URL, else its result backend URL,
names the database) or a database URL.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery_pgqueue.errors import ConfigurationError
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.options import DatabaseURL, PgQueueOptions, app_database
from celery_pgqueue.store import Store


def store_for(app_or_url: Any) -> Store:
    """The process's store for an app's tier database (or for a URL)."""
    if isinstance(app_or_url, str):
        return Store.for_url(DatabaseURL.parse(app_or_url))
    found = app_database(app_or_url)
    if found is None:
        raise ConfigurationError(
            "neither broker_url nor result_backend of this app is a pgqueue:// URL"
        )
    url, raw_options = found
    return Store.for_url(DatabaseURL.parse(url), PgQueueOptions.parse(raw_options or {}))


def pause(app_or_url: Any, queue: str) -> None:
    """Stop every worker claiming from ``queue`` (durable; creates the queue if new)."""
    store = store_for(app_or_url)
    store.ensure_queues([queue])
    store.set_queue_active(queue, False)


def resume(app_or_url: Any, queue: str) -> None:
    """Let workers claim from ``queue`` again; idle workers are woken at once."""
    store_for(app_or_url).set_queue_active(queue, True)


def set_priority(app_or_url: Any, queue: str, priority: int) -> None:
    """Set the priority of ``queue``'s jobs that name none (lower runs sooner)."""
    store_for(app_or_url).set_queue_priority(queue, priority)


def cancel(app_or_url: Any, task_ids: Iterable[str]) -> int:
    """Cancel queued tasks durably; returns how many were still waiting."""
    return store_for(app_or_url).cancel([job_id_for(t) for t in task_ids])
