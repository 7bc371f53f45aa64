"""The node's completion writer: the finishes of a prefork node's pool processes, written
in batches by one thread of the worker's main process.

Group commit without a timer: the thread sleeps on its socket; woken, it takes every
finish waiting there and writes them as one statement (``FINISH_MANY``); what arrives
while that statement runs is the next batch. A lone finish is written at once, so a
quiet node pays no window, and a busy one pays one round trip per batch instead of
one per task, on one connection instead of one per pool process. Each pool process
waits for its reply (:mod:`celery_pgqueue.relay`), so a task's state is committed
before Celery hears of its end, as when the process wrote it itself.

Started when a prefork pool forks its first process, when ``batch_finishes`` says so
(``None``, the default: with a concurrency of at least :data:`AUTO_MIN_CONCURRENCY`).
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import socket
import threading
from typing import Any

from celery import signals

from celery_pgqueue import relay
from celery_pgqueue.store.batches import Finish

logger = logging.getLogger("celery_pgqueue")

AUTO_MIN_CONCURRENCY = 4
"""Pool size from which ``batch_finishes=None`` batches: below it the hop through the
main process cost more than the round trips it saved (README, "Scaling out")."""

MAX_BATCH = 500
"""Most finishes in one statement."""

Waiting = tuple[Any, int, Finish]  # (reply address, request number, finish)


class CompletionWriter:
    """One thread writing the finishes the node's pool processes send it."""

    def __init__(self, store: Any, notify: bool) -> None:
        self.store = store
        self.notify = notify
        self.token = secrets.token_hex(16)
        self.owner = os.getpid()
        self.address = f"\0celery-pgqueue-{os.getpid()}-{secrets.token_hex(6)}".encode()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.batches = 0
        self.finishes = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="celery-pgqueue-completions", daemon=True
        )

    @property
    def endpoint(self) -> relay.Endpoint:
        return relay.Endpoint(self.address, self.token, self.owner)

    def start(self) -> CompletionWriter:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Write what has arrived, then stop."""
        self._stopping.set()
        self._thread.join(5)
        self.sock.close()

    def _run(self) -> None:
        later: list[Waiting] = []
        while not (self._stopping.is_set() and not later):
            if not later:
                select.select([self.sock], [], [], 0.5)
            batch, later = _dedupe(later + self._received())
            if batch:
                self._write(batch)

    def _received(self) -> list[Waiting]:
        got: list[Waiting] = []
        while len(got) < MAX_BATCH:
            try:
                data, address = self.sock.recvfrom(relay.MAX_DATAGRAM + 1024)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # closed at stop
            decoded = relay.decode(data, self.token)
            if decoded is not None:
                got.append((address, decoded[0], decoded[1]))
        return got

    def _write(self, batch: list[Waiting]) -> None:
        finishes = [finish for _, _, finish in batch]
        try:
            written: set[Any] | None = self.store.retrying(
                lambda: self.store.finish_many(finishes, notify=self.notify),
                what=f"the finishes of {len(finishes)} tasks",
            )
        except Exception as exc:
            # Each pool process then writes its own (and raises as it would have).
            logger.warning("pgqueue could not write a batch of finishes: %s", exc)
            written = None
        self.batches += 1
        self.finishes += len(batch)
        for address, request, finish in batch:
            relay.reply(
                self.sock, address, request, None if written is None else finish.job_id in written
            )


def _dedupe(waiting: list[Waiting]) -> tuple[list[Waiting], list[Waiting]]:
    """One finish per job per statement (two updates of one row in one statement would
    keep only one); a second one waits for the next batch, in order."""
    batch: list[Waiting] = []
    later: list[Waiting] = []
    seen: set[Any] = set()
    for item in waiting:
        job_id = item[2].job_id
        if job_id in seen or len(batch) >= MAX_BATCH:
            later.append(item)
        else:
            seen.add(job_id)
            batch.append(item)
    return batch, later


# -- starting with a prefork pool -------------------------------------------------------

_writer: CompletionWriter | None = None
_app: Any = None
_lock = threading.Lock()


def wanted(setting: bool | None, concurrency: int) -> bool:
    """Whether a prefork pool of ``concurrency`` processes batches its finishes."""
    if setting is None:
        return concurrency >= AUTO_MIN_CONCURRENCY
    return setting


def _before_fork(sender: Any = None, **_: Any) -> None:
    """Start this node's writer before its first pool process forks, if it is wanted."""
    global _writer
    with _lock:
        if _writer is not None and _writer.owner == os.getpid():
            return
        app = _app or _current_app()
        backend: Any = getattr(app, "backend", None)
        options = getattr(backend, "options", None)
        if not getattr(backend, "settles_jobs", False) or options is None:
            return
        concurrency = int(getattr(sender, "_processes", 0) or 0)
        if not wanted(options.batch_finishes, concurrency):
            return
        _writer = CompletionWriter(backend.store, notify=options.use_notify).start()
        relay.serve_at(_writer.endpoint)


def _at_worker_init(sender: Any = None, **_: Any) -> None:
    global _app
    _app = getattr(sender, "app", None)


def _current_app() -> Any:
    from celery import current_app

    return current_app._get_current_object()


def _after_fork_in_child(**_: Any) -> None:
    """A pool process owns no writer: its parent's socket stays the parent's."""
    global _writer
    if _writer is not None and _writer.owner != os.getpid():
        _writer = None


def _at_shutdown(**_: Any) -> None:
    global _writer
    with _lock:
        writer, _writer = _writer, None
    if writer is not None and writer.owner == os.getpid():
        relay.serve_at(None)
        writer.stop()


def running() -> CompletionWriter | None:
    """This process's writer, if it runs one."""
    return _writer


signals.worker_init.connect(
    _at_worker_init, weak=False, dispatch_uid="celery_pgqueue.completions.app"
)
signals.worker_before_create_process.connect(
    _before_fork, weak=False, dispatch_uid="celery_pgqueue.completions"
)
signals.worker_process_init.connect(
    _after_fork_in_child, weak=False, dispatch_uid="celery_pgqueue.completions.child"
)
signals.worker_shutdown.connect(
    _at_shutdown, weak=False, dispatch_uid="celery_pgqueue.completions.stop"
)
