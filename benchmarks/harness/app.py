"""The Celery app every benchmark worker and producer imports, whatever the broker.

Configuration comes from the JSON file named by ``$BENCH_CONFIG`` (written by the
harness per configuration), so every broker runs the very same module and task.

The task does nothing. What the harness needs is recorded around it by signals, in
the process that ran it: ``task_prerun`` notes the start time, ``task_postrun`` (after
Celery stored the result, if any) appends ``id publish_ts start end`` to an in-memory
deque. A daemon thread writes the deque out every ``FLUSH_EVERY`` seconds with one
``write`` on an ``O_APPEND`` file per process, so the hot path is two ``time.time()``
calls and an append, and the harness can count completions while the worker runs
without asking the broker or the result backend anything.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals

FLUSH_EVERY = 0.2  # seconds between record flushes in each worker process

CONFIG: dict[str, Any] = json.loads(Path(os.environ["BENCH_CONFIG"]).read_text())
RECORD_DIR = os.environ.get("BENCH_RECORD_DIR", "")
READY_FILE = os.environ.get("BENCH_READY_FILE", "")

if str(CONFIG.get("broker_url", "")).startswith("pgqueue://"):
    import celery_pgqueue  # noqa: F401  (the .pth hook registers it too; be explicit)

app = Celery("bench")
app.conf.update(CONFIG)


@app.task(name="bench.noop")
def noop(published_at: float | None = None) -> None:
    """The measured task: no work at all."""
    return None


# -- worker-side records ----------------------------------------------------------

_started: dict[str, float] = {}
_done: collections.deque[str] = collections.deque()
_flusher: threading.Thread | None = None
_flusher_pid = 0


def _flush() -> None:
    if not RECORD_DIR or not _done:
        return
    lines = []
    while True:
        try:
            lines.append(_done.popleft())
        except IndexError:
            break
    if not lines:
        return
    path = os.path.join(RECORD_DIR, f"records-{os.getpid()}.txt")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(lines).encode())
    finally:
        os.close(fd)


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_EVERY)
        try:
            _flush()
        except OSError:
            pass


def _start_flusher(**_: Any) -> None:
    # A forked pool child inherits no threads: each process that runs tasks starts its own.
    global _flusher, _flusher_pid
    if _flusher is not None and _flusher_pid == os.getpid():
        return
    _flusher_pid = os.getpid()
    _flusher = threading.Thread(target=_flush_forever, name="bench-flush", daemon=True)
    _flusher.start()


def _on_prerun(task_id: str = "", **_: Any) -> None:
    _started[task_id] = time.time()


def _on_postrun(task_id: str = "", args: Any = None, kwargs: Any = None, **_: Any) -> None:
    end = time.time()
    start = _started.pop(task_id, end)
    published = None
    if args:
        published = args[0]
    elif kwargs:
        published = kwargs.get("published_at")
    _done.append(f"{task_id} {published if published is not None else '-'} {start!r} {end!r}\n")


def _on_ready(**_: Any) -> None:
    _start_flusher()
    if READY_FILE:
        Path(READY_FILE).write_text(str(os.getpid()))


def _on_shutdown(**_: Any) -> None:
    _flush()


signals.task_prerun.connect(_on_prerun, weak=False)
signals.task_postrun.connect(_on_postrun, weak=False)
signals.worker_process_init.connect(_start_flusher, weak=False)
signals.worker_ready.connect(_on_ready, weak=False)
signals.worker_process_shutdown.connect(_on_shutdown, weak=False)
signals.worker_shutdown.connect(_on_shutdown, weak=False)
