"""Real-PostgreSQL harness: one server per session, one fresh database per test.

Migrating is slow compared with copying, so migrations run once into a template
database and every test gets ``CREATE DATABASE ... TEMPLATE`` (tens of ms) for
full isolation.  All database names are generated here (never taken from
input), random per process so pytest-xdist workers sharing one server never
collide, and always quoted with ``psycopg.sql.Identifier``.

Note: pytest-celery's plugin rebinds ``celery_worker`` to Docker; tests here
start workers themselves and must not use that fixture.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator

import kombu
import psycopg
import pytest
from celery import signals
from helpers import settle_worker_threads, with_database
from kombu.asynchronous import set_event_loop
from psycopg import sql
from transport_process.procs import Database, Workers, pgqueue_url


def pytest_configure(config: pytest.Config) -> None:
    """Declare markers here too so the suite works without pyproject's ini section."""
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "worker: starts a real Celery worker")


@signals.worker_init.connect(weak=False)
def _own_event_loop_per_worker(**_: object) -> None:
    """Kombu < 5.7 leaves a stopped worker's hub as the process's event loop.

    The next in-process worker (``start_worker``, as the tests use it) then adopts that
    closed hub and its timer, which nothing drives: ETA and countdown tasks never run
    (the same with Redis as broker and backend). Kombu 5.7 unsets a hub it closes; this
    does the same for older Kombu. A worker process of its own never meets this.
    """
    if tuple(kombu.VERSION[:2]) < (5, 7):
        set_event_loop(None)


@pytest.fixture(autouse=True)
def _one_stuck_worker_fails_one_test() -> Iterator[None]:
    """One in-process worker that outlives its test fails that test, not every later one
    (see ``settle_worker_threads``; once, it timed out a whole CI run)."""
    before = set(threading.enumerate())
    yield
    stuck = settle_worker_threads(before)
    if stuck:
        pytest.fail("worker thread(s) still running after the test:\n" + "\n".join(stuck))


def _generated_name(kind: str) -> str:
    """A fresh, valid, collision-free database name like ``cpq_test_1f2e...``."""
    return f"cpq_{kind}_{secrets.token_hex(8)}"


def _admin(admin_url: str) -> psycopg.Connection[tuple[object, ...]]:
    """Autocommit connection for CREATE/DROP DATABASE (not allowed in a transaction)."""
    return psycopg.connect(admin_url, autocommit=True)


def _create_database(admin_url: str, name: str, template: str) -> str:
    """Create ``name`` as a copy of ``template`` and return its URL."""
    with _admin(admin_url) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    return with_database(admin_url, name)


def _drop_database(admin_url: str, name: str) -> None:
    """Drop ``name`` even if a test leaked connections (workers, pools)."""
    with _admin(admin_url) as conn:
        if conn.info.server_version >= 130000:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            return
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """Admin URL of the session's server: $CELERY_PGQUEUE_TEST_URL, local 5432 or embedded."""
    from celery_pgqueue.devserver import resolve_database_url

    url, server = resolve_database_url()
    try:
        yield url
    finally:
        if server is not None:
            server.cleanup()


@pytest.fixture(scope="session")
def template_database(pg_server_url: str) -> Iterator[str]:
    """Name of a database migrated to head once per session, cloned by each test."""
    from celery_pgqueue.migrate import upgrade

    name = _generated_name("tmpl")
    _create_database(pg_server_url, name, "template0")
    try:
        upgrade(with_database(pg_server_url, name))
        with _admin(pg_server_url) as conn:
            # CREATE DATABASE ... TEMPLATE fails while anyone is connected to the
            # template, so close stragglers and refuse new connections for good.
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
                    sql.Identifier(name)
                )
            )
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        yield name
    finally:
        _drop_database(pg_server_url, name)


def _fresh_database(admin_url: str, template: str, kind: str) -> Iterator[str]:
    name = _generated_name(kind)
    url = _create_database(admin_url, name, template)
    try:
        yield url
    finally:
        _drop_database(admin_url, name)


@pytest.fixture
def database_url(pg_server_url: str, template_database: str) -> Iterator[str]:
    """URL of a migrated database private to this test."""
    yield from _fresh_database(pg_server_url, template_database, "test")


@pytest.fixture(scope="module")
def module_database_url(pg_server_url: str, template_database: str) -> Iterator[str]:
    """URL of a migrated database shared by one module (for slow worker tests)."""
    yield from _fresh_database(pg_server_url, template_database, "mod")


@pytest.fixture
def empty_database_url(pg_server_url: str) -> Iterator[str]:
    """URL of a database with no migrations applied (for migration tests)."""
    yield from _fresh_database(pg_server_url, "template0", "empty")


# -- real `celery worker` processes (tests/transport_process, tests/faults) -----------

_MEASUREMENTS: list[str] = []


@pytest.fixture
def broker_url(database_url: str) -> str:
    """The test database as a ``pgqueue://`` broker URL."""
    return pgqueue_url(database_url)


@pytest.fixture
def db(database_url: str) -> Database:
    """Reads of the test database's rows (tests/store has its own, finer ``db``)."""
    return Database(database_url)


@pytest.fixture
def workers() -> Iterator[Workers]:
    """Workers a test starts; every one is killed at teardown, whatever the outcome."""
    started = Workers()
    try:
        yield started
    finally:
        started.reap_all()


@pytest.fixture
def measure(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """``measure("text")`` keeps a line for the terminal summary, named by the test."""

    def add(text: str) -> None:
        _MEASUREMENTS.append(f"{request.node.name}: {text}")
        print(f"{request.node.name}: {text}")

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    """Figures the process and fault tests measured, so ``pytest -q`` shows them."""
    if _MEASUREMENTS:
        terminalreporter.section("measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)
