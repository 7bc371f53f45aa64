"""One retention for completed jobs, whichever path prunes them.

The worker's maintenance, the backend's ``celery.backend_cleanup`` and the CLI's
``prune`` all keep completed and cancelled jobs for ``completed_retention``, else
Celery's ``result_expires``, else one day: also when ``result_expires`` is None (Celery's
"never"), because the tier keeps no permanent history.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from celery_pgqueue import transport
from celery_pgqueue.store import Store

from .conftest import Jobs, Result, pgqueue_url

pytestmark = pytest.mark.slow


def _aged_pair(jobs: Jobs, sql: Callable[..., Any]) -> tuple[uuid.UUID, uuid.UUID]:
    """A completed job of 25 hours and one of 12 hours."""
    old, young = jobs.completed(), jobs.completed()
    for job_id, interval in ((old, "25 hours"), (young, "12 hours")):
        sql("UPDATE jobs SET updated_at = now() - %s::interval WHERE id = %s", interval, job_id)
    return old, young


def _app(database_url: str) -> Celery:
    app = Celery("retention", set_as_current=False)
    url = pgqueue_url(database_url)
    app.conf.update(broker_url=url, result_backend=url, result_expires=None)
    return app


def test_with_result_expires_none_every_path_keeps_completed_jobs_one_day(
    celery_cli: Callable[..., Result],
    write_app: Callable[..., str],
    database_url: str,
    jobs: Jobs,
    sql: Any,
    store: Store,
) -> None:
    kept: list[uuid.UUID] = []

    # The CLI's prune.
    old, young = _aged_pair(jobs, sql)
    module = write_app(broker_url=pgqueue_url(database_url), result_expires=None)
    assert celery_cli("prune", app=module).code == 0
    assert (store.job(old), store.job(young) is not None) == (None, True), "CLI prune"
    kept.append(young)

    # The result backend's cleanup (celery.backend_cleanup).
    app = _app(database_url)
    try:
        old, young = _aged_pair(jobs, sql)
        app.backend.cleanup()
        assert (store.job(old), store.job(young) is not None) == (None, True), "cleanup"
        kept.append(young)

        # A worker's maintenance pass (Celery's current app is the worker's).
        old, young = _aged_pair(jobs, sql)
        app.set_current()
        transport.run_maintenance(store)
        assert (store.job(old), store.job(young) is not None) == (None, True), "maintenance"
        kept.append(young)
    finally:
        app.close()
    assert all(store.job(j) is not None for j in kept)
