"""Options apply to the role that names them, whichever role opened the shared pool.

A process whose broker and result backend name one database keeps one connection pool
for both. Broker options must still govern broker work (claims, leases, publish
wake-ups) and backend options backend work (result writes), whether the broker or the
backend opened the pool first: a web process often reads a result before it publishes.
Options of the pool itself cannot differ, and are refused at once, naming both values.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from celery import Celery
from psycopg import sql

from celery_pgqueue.errors import ConfigurationError
from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.store import Store


def _app(make_app: Callable[..., Celery], broker: dict[str, Any], backend: dict[str, Any]) -> Any:
    app = make_app(broker_transport_options=broker, result_backend_transport_options=backend)
    app.conf.result_backend = app.conf.broker_url
    return app


def _backend_first(app: Celery) -> None:
    """What a web process does when it reads a result before it first publishes."""
    assert app.AsyncResult(str(uuid.uuid4())).state == "PENDING"


def _broker_first(app: Celery) -> None:
    """What a worker does: the transport connects before any result is written."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        conn.default_channel  # noqa: B018 - opening the channel opens the store


def test_the_brokers_lease_governs_claims_when_the_backend_opened_the_pool(
    make_app: Callable[..., Celery], database_url: str
) -> None:
    app = _app(make_app, {"lease_seconds": 300.0}, {"lease_seconds": 20.0})
    _backend_first(app)
    app.send_task("t.anything", queue="celery")
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue("celery").get(timeout=10)
        with psycopg.connect(database_url) as db:
            [(lease,)] = db.execute(
                "SELECT extract(epoch FROM lease_expires_at - now()) FROM jobs"
                " WHERE status = 'running'"
            ).fetchall()
        message.ack()
    assert 200 < lease <= 300, f"the broker's lease_seconds=300 gave a lease of {lease:.0f} s"


def test_the_brokers_use_notify_wakes_workers_when_the_backend_opened_the_pool(
    make_app: Callable[..., Celery], database_url: str, broker_url: str
) -> None:
    broker = {"use_notify": True}
    app = _app(make_app, broker, {"use_notify": False})
    _backend_first(app)
    channel = Store.for_url(broker_url, PgQueueOptions.parse(broker)).channel
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        app.send_task("t.anything", queue="celery")
        heard = [n.payload for n in listener.notifies(timeout=2.0, stop_after=1)]
    assert heard == ["celery"], "the publish must wake workers: the broker says use_notify"


@pytest.fixture
def commit_settings(database_url: str) -> Callable[[], list[tuple[str, str]]]:
    """Record the synchronous_commit in force for every write to ``jobs``.

    The database's own default is set to ``on`` (the test server runs with it off), so
    a role that asks for nothing gets ``on`` and one that turns it off shows ``off``.
    """
    with psycopg.connect(database_url, autocommit=True) as admin:
        name = admin.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET synchronous_commit = on").format(sql.Identifier(name))
        )
        admin.execute("CREATE TABLE commit_seen (status text, setting text)")
        admin.execute(
            """
            CREATE FUNCTION record_commit_setting() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO commit_seen VALUES (NEW.status, current_setting('synchronous_commit'));
                RETURN NEW;
            END $$
            """
        )
        admin.execute(
            "CREATE TRIGGER record_commit_setting AFTER INSERT OR UPDATE ON jobs"
            " FOR EACH ROW EXECUTE FUNCTION record_commit_setting()"
        )

    def seen() -> list[tuple[str, str]]:
        with psycopg.connect(database_url, autocommit=True) as db:
            return [tuple(r) for r in db.execute("SELECT status, setting FROM commit_seen")]

    return seen


@pytest.mark.parametrize("opened_by", ["broker", "backend"])
@pytest.mark.parametrize("off_for", ["broker", "backend"])
def test_synchronous_commit_is_each_roles_own(
    make_app: Callable[..., Celery],
    commit_settings: Callable[[], list[tuple[str, str]]],
    opened_by: str,
    off_for: str,
) -> None:
    off = {"synchronous_commit": False}
    app = _app(make_app, off if off_for == "broker" else {}, off if off_for == "backend" else {})
    (_broker_first if opened_by == "broker" else _backend_first)(app)

    # Published twice each: the first run of a statement and the later, faster path.
    for _ in range(2):
        app.send_task("t.anything", queue="celery")
    for _ in range(2):
        app.backend.store_result(str(uuid.uuid4()), 42, "SUCCESS")

    broker_setting = "off" if off_for == "broker" else "on"
    backend_setting = "off" if off_for == "backend" else "on"
    assert sorted(commit_settings()) == sorted(
        [("queued", broker_setting)] * 2 + [("completed", backend_setting)] * 2
    )


@pytest.mark.parametrize(
    ("option", "broker_value", "backend_value"),
    [("prepared_statements", False, True), ("pool_size", 10, 5), ("pool_timeout", 5.0, 30.0)],
)
def test_pool_options_that_differ_are_refused_naming_both_values(
    make_app: Callable[..., Celery],
    option: str,
    broker_value: Any,
    backend_value: Any,
) -> None:
    app = _app(make_app, {option: broker_value}, {option: backend_value})
    with pytest.raises(ConfigurationError) as raised:
        app.backend  # noqa: B018 - made at start: by the worker, or at the first result
    message = str(raised.value)
    assert option in message
    assert repr(broker_value) in message and repr(backend_value) in message
    assert "broker_transport_options" in message
    assert "result_backend_transport_options" in message


def test_a_second_role_that_disagrees_on_the_pool_is_refused_whoever_came_first(
    broker_url: str,
) -> None:
    """The web process of the issue: it read a result (prepared statements on, the
    default) and then publishes through PgBouncer with them off."""
    Store.for_url(broker_url, PgQueueOptions())
    with pytest.raises(ConfigurationError) as raised:
        Store.for_url(broker_url, PgQueueOptions(prepared_statements=False, use_notify=False))
    assert "'prepared_statements' is False here but True" in str(raised.value)


def test_options_of_the_roles_themselves_may_differ_on_one_pool(broker_url: str) -> None:
    backend = Store.for_url(broker_url, PgQueueOptions(use_notify=False, lease_seconds=5.0))
    broker = Store.for_url(broker_url, PgQueueOptions(polling_interval=0.2))
    assert broker.pool is backend.pool
    assert (broker.options.use_notify, broker.options.lease_seconds) == (True, 20.0)
    assert (backend.options.use_notify, backend.options.lease_seconds) == (False, 5.0)
    assert Store.for_url(broker_url, PgQueueOptions(polling_interval=0.2)) is broker
