"""A private PgBouncer in transaction pooling mode, for one test.

Debian's ``pgbouncer`` package provides ``/usr/sbin/pgbouncer`` (CI installs it). It
runs in the foreground on a free port, ``auth_type = trust``, in front of the test
server; as root it switches to ``nobody`` (PgBouncer refuses to run as root), so its
files live in a world-readable directory of their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

from celery_pgqueue.devserver_cluster import free_port

CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")


def binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((path for path in CANDIDATES if os.access(path, os.X_OK)), None)


@contextlib.contextmanager
def running(database_url: str, mode: str = "transaction") -> Iterator[tuple[int, Path]]:
    """Start PgBouncer in ``mode`` pooling in front of ``database_url``'s server.

    Yields (port, log path). The one launcher: the tests and the benchmarks
    (``benchmarks/pgbouncer_latency.py``, ``connections.py --pgbouncer``) use it.
    """
    executable = binary()
    if executable is None:
        raise FileNotFoundError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    target = urlsplit(database_url)
    user = target.username or "postgres"
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="cpq-pgbouncer-"))
    directory.chmod(0o755)
    (directory / "userlist.txt").write_text(f'"{user}" ""\n')
    ini = directory / "pgbouncer.ini"
    ini.write_text(
        "\n".join(
            [
                "[databases]",
                f"* = host={target.hostname or '127.0.0.1'} port={target.port or 5432}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {directory / 'userlist.txt'}",
                f"pool_mode = {mode}",
                "max_client_conn = 200",
                "default_pool_size = 20",
                "ignore_startup_parameters = extra_float_digits",
                "",
            ]
        )
    )
    for path in directory.iterdir():
        path.chmod(0o644)
    log = directory / "pgbouncer.log"
    args = [executable]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*args, str(ini)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                raise AssertionError(f"pgbouncer exited: {log.read_text(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"pgbouncer never listened: {log.read_text()}")
            time.sleep(0.05)
        yield port, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def traffic(url: str, clients: int) -> Iterator[None]:
    """Other clients of the same PgBouncer running short statements, as an app's would.

    Their connections never prepare statements (``prepare_threshold=None``), the way a
    PgBouncer-aware application configures psycopg.
    """
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
                while not stop.is_set():
                    conn.execute("SELECT count(*) FROM job_queues").fetchall()
                    stop.wait(0.002)
        except BaseException as exc:  # reported when the block ends
            errors.append(exc)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert errors == [], errors
