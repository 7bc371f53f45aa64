"""The embedded cluster's parts: its port, config file and log, its processes and tools."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

CONF_NAME = "celery_pgqueue.conf"
"""Written on each start; ``postgresql.conf`` includes it."""
INCLUDE_LINE = f"include_if_exists = '{CONF_NAME}'"
# sun_path is 108 bytes on Linux including the terminating NUL.
MAX_SOCKET_PATH = 107


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a currently unused TCP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process.

    Zombies count as dead: the postmaster is re-parented when ``pg_ctl`` exits,
    and in containers the new parent (pid 1) may never reap it.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (e.g. macOS): trust kill(0)
    # Format: "pid (comm) S ...": comm may contain spaces/parens, so split on the last ')'.
    state = stat_line.rpartition(")")[2].split()
    return not (state and state[0] in {"Z", "X"})


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (backends, checkpointer, ...) via /proc."""
    children: list[int] = []
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return children
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry.name))
    return children


def kill_postmaster(pid: int) -> None:
    """SIGKILL ``pid``'s process group (every backend), as a machine crash would.

    Returns once every process is gone: orphaned backends attached to the old shared
    memory would make the next start fail.
    """
    victims = [pid, *children_of(pid)]
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:  # pragma: no cover - pg_ctl always setsid()s the postmaster
            for victim in victims:
                os.kill(victim, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 30
    while any(pid_alive(victim) for victim in victims):
        if time.monotonic() > deadline:
            raise RuntimeError(f"postmaster {pid} survived SIGKILL")
        time.sleep(0.01)


def run_tool(
    bin_dir: Path, tool: str, *args: str, run_as: tuple[int, int] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL binary (as the server account ``run_as``, when we are root).

    Output goes to a temporary file, not a pipe: the postmaster started by
    ``pg_ctl`` may inherit pipe ends and make ``communicate()`` hang.
    """
    uid, gid = run_as if run_as is not None else (None, None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(
            [str(bin_dir / tool), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd="/",  # the server account may not be allowed into our cwd
            env=env,
            check=False,
            timeout=120,
            user=uid,
            group=gid,
            extra_groups=[] if uid is not None else None,  # drop root's groups
        )
        out.seek(0)
        output = out.read()
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")


def include_config(datadir: Path) -> None:
    """Make a fresh cluster's ``postgresql.conf`` read :data:`CONF_NAME`."""
    with (datadir / "postgresql.conf").open("a") as fh:
        fh.write(f"\n# written on each start by celery_pgqueue.devserver\n{INCLUDE_LINE}\n")


def write_config(
    datadir: Path, port: int, settings: Mapping[str, str], run_as: tuple[int, int] | None
) -> None:
    """(Re)write listen address, port and speed settings before each start."""
    socket_path = datadir / f".s.PGSQL.{port}"
    socket_dir = str(datadir) if len(str(socket_path)) <= MAX_SOCKET_PATH else ""
    lines = {
        "listen_addresses": _conf_quote("127.0.0.1"),
        "port": str(port),
        # Inside the datadir so servers never share /tmp lock files; '' = TCP only
        # when the path would be too long for a unix socket.
        "unix_socket_directories": _conf_quote(socket_dir),
        **{key: _conf_quote(value) for key, value in settings.items()},
    }
    text = "".join(f"{key} = {value}\n" for key, value in lines.items())
    target = datadir / CONF_NAME
    target.write_text(text)
    if run_as is not None:
        os.chown(target, *run_as)


def read_from(path: Path, offset: int) -> str:
    """``path``'s text after ``offset`` (the server log since a start), or ''."""
    try:
        with path.open("r", errors="replace") as fh:
            fh.seek(offset)
            return fh.read()
    except OSError:
        return ""


def _conf_quote(value: str) -> str:
    """Quote a value for postgresql.conf."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
