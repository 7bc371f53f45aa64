"""Fixtures for the store tests: a Store on a fresh migrated database, and raw SQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from store_factories import Db

from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.store import Store
from celery_pgqueue.store.listener import Listener


@pytest.fixture
def db(database_url: str) -> Iterator[Db]:
    helper = Db(database_url)
    yield helper
    helper.engine.dispose()


@pytest.fixture
def make_store(database_url: str) -> Iterator[Callable[..., Store]]:
    """Build Stores with given options on this test's database; disposed after."""
    made: list[Store] = []

    def make(**options: Any) -> Store:
        store = Store(database_url, PgQueueOptions(**options))
        made.append(store)
        return store

    yield make
    for store in made:
        store.dispose()


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    return make_store()


@pytest.fixture
def listener(store: Store) -> Iterator[Listener]:
    """A LISTEN connection on the workers' channel of ``store``'s schema."""
    listening = Listener(store.url, [store.channel], connect_timeout=5)
    listening.connect()
    yield listening
    listening.close()
