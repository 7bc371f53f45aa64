"""Fixtures for transport tests: an app on a fresh database and an in-thread worker."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from celery_pgqueue.leases import LeaseKeeper
from celery_pgqueue.store import Store


def pgqueue_url(database_url: str) -> str:
    """The broker URL for a test database URL."""
    return "pgqueue://" + database_url.split("://", 1)[1]


@pytest.fixture
def broker_url(database_url: str) -> str:
    return pgqueue_url(database_url)


@pytest.fixture
def store(broker_url: str) -> Store:
    return Store.for_url(broker_url)


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    """Each test's database is dropped afterwards: let go of its pooled connections."""
    yield
    LeaseKeeper.stop_all()
    Store.close_all()


@pytest.fixture
def make_app(broker_url: str) -> Callable[..., Celery]:
    """A Celery app on the test database; keyword arguments become its config."""
    apps: list[Celery] = []

    def factory(**conf: Any) -> Celery:
        app = Celery(f"t{len(apps)}", set_as_current=False)
        app.conf.update(
            broker_url=broker_url,
            result_backend=None,
            broker_transport_options={"polling_interval": 0.5, "maintenance_interval": 1.0},
            worker_hijack_root_logger=False,
            broker_connection_retry_on_startup=True,
        )
        app.conf.update(conf)
        apps.append(app)
        return app

    yield factory  # type: ignore[misc]
    for app in apps:
        with contextlib.suppress(Exception):
            app.close()


class Recorder:
    """What tasks did, in order, as seen by the test process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[Any] = []

    def add(self, item: Any) -> None:
        with self.lock:
            self.calls.append(item)

    def snapshot(self) -> list[Any]:
        with self.lock:
            return list(self.calls)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
