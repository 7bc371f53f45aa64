"""Fixtures for the beat tests: apps with a beat_schedule on a fresh database, and
schedulers driven tick by tick in this process (the process tests start real
``celery beat`` processes instead)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from helpers import wait_until

from celery_pgqueue.beat import Scheduler
from celery_pgqueue.store import Store


@pytest.fixture
def broker_url(database_url: str) -> str:
    return "pgqueue://" + database_url.split("://", 1)[1]


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    """Each test's database is dropped afterwards: let go of pooled connections."""
    yield
    Store.close_all()


@pytest.fixture
def make_app(broker_url: str) -> Iterator[Callable[..., Celery]]:
    """A Celery app on the test database; keyword arguments become its config."""
    apps: list[Celery] = []

    def factory(schedule: dict[str, Any], **conf: Any) -> Celery:
        app = Celery(conf.pop("main", "beattest"), set_as_current=False)
        app.conf.update(
            broker_url=broker_url,
            result_backend=None,
            beat_schedule=schedule,
            pgqueue_beat_lease_seconds=2.0,
            broker_connection_retry_on_startup=True,
        )
        app.conf.update(conf)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        with contextlib.suppress(Exception):
            app.close()


@pytest.fixture
def schedulers() -> Iterator[Callable[[Celery], Scheduler]]:
    """Schedulers built for a test; each is closed at teardown (releasing its lease)."""
    made: list[Scheduler] = []

    def build(app: Celery) -> Scheduler:
        scheduler = Scheduler(app)
        made.append(scheduler)
        return scheduler

    yield build
    for scheduler in made:
        with contextlib.suppress(Exception):
            scheduler.close()


def tick_until(check: Callable[[], Any], *schedulers: Scheduler, timeout: float = 10.0) -> Any:
    """Tick every scheduler (as `celery beat` does, without its sleep) until ``check``."""

    def step() -> Any:
        for scheduler in schedulers:
            scheduler.tick()
        return check()

    return wait_until(step, timeout=timeout, interval=0.02)
