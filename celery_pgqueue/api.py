"""Python API for operators: pause, resume, reprioritise, limit, cancel.

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


def store_for(app_or_url: Any, options: PgQueueOptions | None = None) -> Store:
    """The process's store for a Celery app (its pgqueue broker, else result backend) or a URL.

    ``options`` default to the app's transport options for that URL (none for a URL).
    """
    if isinstance(app_or_url, str | DatabaseURL):
        return Store.for_url(app_or_url, options)
    found = app_database(app_or_url)
    if found is None:
        raise ConfigurationError(
            "the Celery app uses no PostgreSQL database: set broker_url or result_backend "
            "to pgqueue://…, or pass the URL"
        )
    url, raw_options = found
    return Store.for_url(url, options or PgQueueOptions.parse(raw_options or {}))


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


def set_limit(app_or_url: Any, queue: str, limit: int | None) -> None:
    """Let at most ``limit`` jobs of ``queue`` run at once across all workers.

    ``None`` removes the limit; 0 holds the queue's jobs back. Claimed jobs count,
    prefetched ones included. Raises ``UnknownQueue`` for a queue never used and
    ``ConfigurationError`` for a negative limit.
    """
    store_for(app_or_url).set_queue_limit(queue, limit)


def limit(app_or_url: Any, queue: str) -> int | None:
    """``queue``'s concurrency limit, or None when it has none."""
    value = store_for(app_or_url).queue(queue)["concurrency_limit"]
    return None if value is None else int(value)


def cancel(app_or_url: Any, task_ids: Iterable[str]) -> int:
    """Cancel queued tasks durably; returns how many were still waiting."""
    return store_for(app_or_url).cancel([job_id_for(t) for t in task_ids])
