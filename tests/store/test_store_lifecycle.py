"""The Store itself: one per URL and schema, unreachable servers, fork safety."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from store_factories import Db, new_job

from celery_pgqueue.errors import DatabaseUnavailable
from celery_pgqueue.options import DatabaseURL, PgQueueOptions
from celery_pgqueue.store import Store

UNREACHABLE = "postgresql://alice:s3cr%40t-pw@127.0.0.1:1/tier"


@pytest.fixture
def unreachable() -> Iterator[Store]:
    store = Store(UNREACHABLE, PgQueueOptions(connect_timeout=1))
    yield store
    store.dispose()


def backend_pid(store: Store) -> int:
    with store.begin() as conn:
        pid: int = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    return pid


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.claim("default", 1, "worker"),
        lambda s: s.enqueue([new_job()]),
        lambda s: s.check_schema(),
        lambda s: s.prune(completed_retention=60),
    ],
    ids=["claim", "enqueue", "check_schema", "prune"],
)
def test_unreachable_server_raises_database_unavailable_without_the_password(
    unreachable: Store, call: object
) -> None:
    with pytest.raises(DatabaseUnavailable) as raised:
        call(unreachable)  # type: ignore[operator]

    message = str(raised.value)
    assert "127.0.0.1:1" in message
    assert "alice:**@" in message
    assert "s3cr" not in message and "s3cr%40t" not in message
    assert isinstance(raised.value, ConnectionError)


def test_for_url_returns_one_store_per_database_and_schema(database_url: str) -> None:
    first = Store.for_url(database_url)
    try:
        assert Store.for_url(database_url) is first
        # The same server and database spelled with our scheme is the same store.
        assert Store.for_url(database_url.replace("postgresql://", "pgqueue://", 1)) is first
        assert Store.for_url(DatabaseURL.parse(database_url)) is first
        other_schema = Store.for_url(database_url, PgQueueOptions(schema="tier"))
        assert other_schema is not first
        assert other_schema.options.schema == "tier"
        assert Store.for_url(database_url, PgQueueOptions(schema="tier")) is other_schema
    finally:
        first.dispose()


def backend_pid_in_forked_child(store: Store) -> int:
    """Fork; the child enqueues through ``store`` and reports its backend pid."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_end)
            store.enqueue([new_job("child")])
            os.write(write_end, struct.pack("!q", backend_pid(store)))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reported = pipe.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    (pid,) = struct.unpack("!q", reported)
    return int(pid)


@pytest.fixture
def shared_store(database_url: str) -> Iterator[Store]:
    store = Store.for_url(database_url)
    yield store
    store.dispose()


def test_forked_child_uses_its_own_connection_and_parent_keeps_working(
    shared_store: Store, db: Db
) -> None:
    store = shared_store
    store.enqueue([new_job("parent")])
    parent_pid = backend_pid(store)

    child_backend = backend_pid_in_forked_child(store)

    assert child_backend != parent_pid, "the child must not reuse the parent's socket"
    assert backend_pid(store) == parent_pid, "the parent's pooled connection survived"
    assert store.enqueue([new_job("parent")]) == 1
    assert dict(db.all("SELECT queue_name, count(*) FROM jobs GROUP BY 1")) == {
        "parent": 2,
        "child": 1,
    }


def test_check_schema_passes_on_a_migrated_database(store: Store) -> None:
    store.check_schema()


def test_a_store_built_directly_is_fork_safe_too(database_url: str) -> None:
    store = Store(database_url)
    try:
        parent_pid = backend_pid(store)

        assert backend_pid_in_forked_child(store) != parent_pid
    finally:
        store.dispose()


@pytest.mark.parametrize(
    ("query", "pool_name", "listen_name"),
    [
        ("", "celery-pgqueue", "celery-pgqueue-listen"),
        ("?application_name=billing-worker", "billing-worker", "billing-worker-listen"),
    ],
)
def test_sessions_carry_the_url_application_name_or_ours(
    database_url: str, db: Db, query: str, pool_name: str, listen_name: str
) -> None:
    """pg_stat_activity tells a deployment's workers apart only if the URL's name is kept."""
    from celery_pgqueue.store.listener import Listener

    url = DatabaseURL.parse(database_url + query)
    store = Store(url)
    listener = Listener(url, [store.channel])
    try:
        listener.connect()
        store.check_schema()  # leaves a pooled session open
        names = dict(
            db.all(
                "SELECT application_name, count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " GROUP BY 1"
            )
        )
    finally:
        listener.close()
        store.dispose()
    assert names.get(listen_name) == 1, names
    assert names.get(pool_name), names
