"""Fixtures for enqueue-in-transaction tests: an app on the test database, statement counts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from tx_support import JobInserts

from celery_pgqueue.store import Store


@pytest.fixture
def urls(database_url: str) -> tuple[str, str]:
    rest = database_url.split("://", 1)[1]
    return f"pgqueue://{rest}", f"postgresql+psycopg://{rest}"


@pytest.fixture
def app(urls: tuple[str, str]) -> Iterator[Any]:
    app = Celery("tx", broker=urls[0], set_as_current=False)
    app.conf.broker_transport_options = {"polling_interval": 0.2}
    yield app
    app.close()
    Store.close_all()


@pytest.fixture
def engine(urls: tuple[str, str]) -> Iterator[sa.Engine]:
    engine = sa.create_engine(urls[1])
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE orders (id int PRIMARY KEY)")
    yield engine
    engine.dispose()


@pytest.fixture
def job_inserts() -> Iterator[JobInserts]:
    counter = JobInserts()
    sa.event.listen(sa.Engine, "before_cursor_execute", counter)
    yield counter
    sa.event.remove(sa.Engine, "before_cursor_execute", counter)
