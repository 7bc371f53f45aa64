"""``celery worker`` and producer subprocesses: started in their own session, always killed.

Every child runs in a new session (its own process group), so SIGKILL of the group
takes the pool children with it. :class:`Children` remembers every group it started
and kills what is left at exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Where ``harness`` is imported from by the child processes: benchmarks/, or the copy a
# run takes at start (see use_copy) so that edits made during a long run change nothing.
ROOT = Path(__file__).resolve().parent.parent


def use_copy(workdir: Path) -> Path:
    """Copy the ``harness`` package into ``workdir`` and run every child from there."""
    import shutil

    global ROOT
    target = workdir / "bench"
    shutil.copytree(
        Path(__file__).resolve().parent,
        target / "harness",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    ROOT = target
    return target


# Process groups started and not yet killed: killed at exit, on errors and on Ctrl-C.
_groups: set[int] = set()


def track(pid: int) -> None:
    """Remember a child started with ``start_new_session=True`` (its pid is its group)."""
    _groups.add(pid)


def kill_group(pid: int) -> None:
    """SIGKILL one process group we started and forget it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    _groups.discard(pid)


def reap(process: subprocess.Popen[Any]) -> None:
    """Kill ``process``'s group if it still runs, else just forget it.

    A group whose leader exited and was reaped is not signalled: its id may be reused.
    """
    if process.poll() is None:
        kill_group(process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
    _groups.discard(process.pid)


def kill_all_children() -> None:
    """SIGKILL every process group we started and have not killed yet (idempotent)."""
    for pid in list(_groups):
        kill_group(pid)


atexit.register(kill_all_children)


def environment(
    config_file: Path, record_dir: Path | None = None, ready_file: Path | None = None
) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_CONFIG_MODULE"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env["BENCH_CONFIG"] = str(config_file)
    env["BENCH_RECORD_DIR"] = str(record_dir or "")
    env["BENCH_READY_FILE"] = str(ready_file or "")
    return env


class Worker:
    """One ``celery -A harness.app worker`` process group."""

    def __init__(
        self,
        workdir: Path,
        config_file: Path,
        pool: str,
        concurrency: int,
        queue: str,
        *,
        name: str,
        loglevel: str = "WARNING",
        wrap: Sequence[str] = (),
    ) -> None:
        self.record_dir = workdir / f"records-{name}"
        self.record_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file = workdir / f"ready-{name}"
        self.log_path = workdir / f"worker-{name}.log"
        self._log = open(self.log_path, "wb")
        command = [
            *wrap,
            sys.executable,
            "-m",
            "celery",
            "-A",
            "harness.app",
            "worker",
            "--pool",
            pool,
            "-c",
            str(concurrency),
            "-Q",
            queue,
            "-n",
            f"{name}@%h",
            "-l",
            loglevel,
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment(config_file, self.record_dir, self.ready_file),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.process.pid
        track(self.pid)
        self._offsets: dict[Path, int] = {}
        self._lines: dict[Path, list[str]] = {}
        self._partial: dict[Path, bytes] = {}

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                return
            if not self.alive():
                raise RuntimeError(
                    f"worker exited with {self.process.returncode} before ready:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log_tail()}")

    def records(self) -> list[str]:
        """Every record line written so far (read incrementally)."""
        for path in sorted(self.record_dir.glob("records-*.txt")):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            if not chunk:
                continue
            self._offsets[path] = offset + len(chunk)
            data = self._partial.pop(path, b"") + chunk
            *complete, rest = data.split(b"\n")
            if rest:
                self._partial[path] = rest
            self._lines.setdefault(path, []).extend(line.decode() for line in complete if line)
        return [line for lines in self._lines.values() for line in lines]

    def wait_records(self, count: int, timeout: float) -> tuple[list[str], bool]:
        """Poll until ``count`` records exist; returns (records, complete)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.records()
            if len(lines) >= count:
                return lines, True
            if time.monotonic() > deadline:
                return lines, False
            if not self.alive():
                raise RuntimeError(
                    f"worker exited with {self.process.returncode} while draining "
                    f"({len(lines)}/{count} done):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def tree(self) -> list[Any]:
        import psutil

        try:
            parent = psutil.Process(self.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        """Resident memory of the worker and its pool children, in bytes."""
        import psutil

        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def child_pids(self) -> list[int]:
        return [p.pid for p in self.tree()[1:]]

    def stop(self, grace: float = 0.0) -> None:
        """SIGKILL the group, after a warm shutdown of up to ``grace`` seconds if asked.

        The measures wait for every record before stopping, so nothing is lost by not
        waiting: a warm shutdown (2-6 s, and for countdown tasks a restore of each) would
        only slow the run. The broker is emptied before the next measurement anyway.
        """
        started = time.monotonic()
        if grace > 0 and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            kill_group(self.pid)
        else:
            # The leader is gone (and reaped): signal only processes still in its group,
            # never a group id the system may have handed to someone else.
            _groups.discard(self.pid)
            for pid in _members_of_group(self.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self._log.close()
        self.stop_seconds = time.monotonic() - started


def _members_of_group(pgid: int) -> list[int]:
    import psutil

    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError, OSError):
            if os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
    return members


def run_producer(
    workdir: Path,
    config_file: Path,
    args: Sequence[str],
    timeout: float,
    wrap: Sequence[str] = (),
) -> dict[str, Any]:
    """Run ``python -m harness.producer ARGS`` to completion; its last stdout line is JSON."""
    log_path = workdir / f"producer-{args[0]}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as err:
        process = subprocess.Popen(
            [*wrap, sys.executable, "-m", "harness.producer", *args],
            cwd=ROOT,
            env=environment(config_file),
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        track(process.pid)
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"producer {args[0]} still running after {timeout:.0f}s; log:\n"
                + log_path.read_text(errors="replace")[-2000:]
            ) from None
        finally:
            reap(process)
    if process.returncode != 0:
        raise RuntimeError(
            f"producer {args[0]} failed ({process.returncode}):\n"
            + log_path.read_text(errors="replace")[-3000:]
        )
    # The last JSON line: a wrapper (py-spy) may print after the producer's own output.
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"producer {args[0]} printed no result; stdout: {out[-500:]!r}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result
