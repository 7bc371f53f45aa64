"""Connections for Kombu's integration mixins (copied as the suite's conftest.py).

One migrated database per run, emptied after each test, so queues, bindings and
messages left by one mixin test never reach another. The server
is the one the project's tests use: ``$CELERY_PGQUEUE_TEST_URL``, local 5432, or an
embedded one.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import kombu
import psycopg
import pytest
from psycopg import sql


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _pgqueue(url: str, port: int | None = None) -> str:
    parts = urlsplit(url)
    if port is not None:
        auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        parts = parts._replace(netloc=f"{auth}{parts.hostname}:{port}")
    return urlunsplit(parts._replace(scheme="pgqueue"))


def _dead_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _admin(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    from celery_pgqueue.devserver import resolve_database_url

    url, server = resolve_database_url()
    try:
        yield url
    finally:
        if server is not None:
            server.cleanup()


@pytest.fixture(scope="session")
def session_database(server_url: str) -> Iterator[str]:
    from celery_pgqueue.migrate import upgrade

    name = f"cpq_kit_{secrets.token_hex(6)}"
    with _admin(server_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = _with_database(server_url, name)
        upgrade(url)
        yield url
    finally:
        with _admin(server_url) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def database_url(session_database: str) -> Iterator[str]:
    """The session's database, emptied: no queue, binding or message survives a test."""
    from celery_pgqueue.store import Store

    yield session_database
    Store.close_all()
    with _admin(session_database) as conn:
        conn.execute("TRUNCATE job_logs, jobs, job_bindings, job_queues CASCADE")


@pytest.fixture
def connection(database_url: str) -> kombu.Connection:
    """The transport as a user configures it: a URL, default transport options."""
    return kombu.Connection(_pgqueue(database_url))


@pytest.fixture
def invalid_connection(database_url: str) -> kombu.Connection:
    return kombu.Connection(_pgqueue(database_url, port=_dead_port()), connect_timeout=1)


@pytest.fixture
def failover_connection(database_url: str) -> kombu.Connection:
    """A dead URL first, the live database second (as Kombu's py-amqp wiring does)."""
    dead = _pgqueue(database_url, port=_dead_port())
    return kombu.Connection(f"{dead};{_pgqueue(database_url)}", connect_timeout=1)
