"""The node's completion writer: the finishes of a prefork node's pool processes, written
in batches by one small process the worker's main process forks next to its pool.

Group commit without a timer: the writer sleeps on its socket; woken, it takes every
finish waiting there and writes them as one statement (``FINISH_MANY``); what arrives
while that statement runs is the next batch. A lone finish is written at once, so a
quiet node pays no window, and a busy one pays one round trip per batch instead of
one per task, on one connection instead of one per pool process. Each pool process
waits for its reply (:mod:`celery_pgqueue.relay`), so a task's state is committed
before Celery hears of its end, as when the process wrote it itself.

A process of its own, not a thread of the main process: that one's interpreter lock is
busy with the event loop feeding the pool, and a batch whose reply waited for it ran
the drain at half the speed (README, "Scaling out"). It exits when the main process
does, writing what has arrived first. Started when a prefork pool forks its first
process, when ``batch_finishes`` is on; by default for a pool of :data:`AUTO_POOL`
processes or more (in a smaller pool a batch holds one or two finishes, so the extra
hop saves little; README, "Scaling out").
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import threading
import time
from collections import OrderedDict
from typing import Any

from celery import signals

from celery_pgqueue import relay
from celery_pgqueue.store.batches import Finish

logger = logging.getLogger("celery_pgqueue")

MAX_BATCH = 500
"""Most finishes in one statement."""

WRITERS = 1
"""Batches in flight at once, each on its own connection. Two did not measurably speed
the drain on a 2-core machine and cost a connection; more than one lets a batch be
gathered while the previous one is written."""

RESTARTS = 3
"""Unexpected exits of the writer process within :data:`RESTART_WINDOW` seconds after
which the main process stops starting another: its pool processes then write their own
finishes (as with ``batch_finishes`` off) rather than feed a writer that keeps dying."""
RESTART_WINDOW = 60.0

ANSWERED = 4096
"""Replies remembered for copies of a request that arrive after it was answered."""

Waiting = tuple[Any, int, Finish]  # (reply address, request number, finish)
Request = tuple[Any, int, Any, int | None]
"""(reply address, request number, job id, attempt): the job too, because a new pool
process may be given a dead one's address and count its requests from 1 again."""


class CompletionWriter:
    """Writes the finishes the node's pool processes send to its socket, one batch at a
    time; runs in a process of its own (:func:`start_process`) or, in tests, a thread."""

    def __init__(self, store: Any, notify: bool, owner: int | None = None) -> None:
        self.store = store
        self.notify = notify
        self.token = secrets.token_hex(16)
        self.owner = os.getpid() if owner is None else owner
        self.address = f"\0celery-pgqueue-{self.owner}-{secrets.token_hex(6)}".encode()
        self.sock = self._bind()
        self.batches = 0
        self.finishes = 0
        self.pid: int | None = None
        self.stopping = threading.Event()
        self.exits: list[float] = []
        """When writer processes exited unexpectedly (main process, monotonic)."""
        self._stopped = False
        self._reading = threading.Lock()
        self._counting = threading.Lock()
        self._pending: set[Request] = set()
        """Requests received and not yet answered: a pool process that waited a second
        sends its request again (a restarted writer never got it), and a copy of one
        still pending is dropped here."""
        self._answered: OrderedDict[Request, bool | None] = OrderedDict()
        """The latest :data:`ANSWERED` replies: a copy that arrives after its answer
        (it waited in the socket while the original was written) gets the same one."""

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self.address)
        sock.setblocking(False)
        return sock

    @property
    def endpoint(self) -> relay.Endpoint:
        return relay.Endpoint(self.address, self.token, self.owner)

    def serve(self) -> None:
        """Write batches until told to stop or the worker's main process is gone; then
        write what has arrived and return. :data:`WRITERS` threads take turns reading
        the socket, so a batch is gathered while the previous one is written."""
        threads = [
            threading.Thread(target=self._serve_one, name=f"pgqueue-completions-{n}")
            for n in range(WRITERS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _serve_one(self) -> None:
        later: list[Waiting] = []
        while True:
            orphaned = os.getpid() != self.owner and os.getppid() != self.owner
            done = self.stopping.is_set() or orphaned
            with self._reading:
                if not later and not done:
                    select.select([self.sock], [], [], 0.5)
                batch, later = _dedupe(later + self._received())
            if batch:
                self._write(batch)
            elif done and not later:
                return

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
            if decoded == relay.STOP:
                self.stopping.set()
                continue
            if not isinstance(decoded, tuple):
                continue
            key = (address, decoded[0], decoded[1].job_id, decoded[1].attempt)
            with self._counting:
                if key in self._pending:
                    continue  # sent again while we wrote it: one reply is enough
                if key in self._answered:
                    relay.reply(self.sock, address, decoded[0], self._answered[key])
                    continue
                self._pending.add(key)
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
        with self._counting:
            self.batches += 1
            self.finishes += len(batch)
        for address, request, finish in batch:
            outcome = None if written is None else finish.job_id in written
            relay.reply(self.sock, address, request, outcome)
            key = (address, request, finish.job_id, finish.attempt)
            with self._counting:
                self._pending.discard(key)
                self._answered[key] = outcome
                if len(self._answered) > ANSWERED:
                    self._answered.popitem(last=False)

    def start_process(self) -> CompletionWriter:
        """Fork the process that serves (its own interpreter lock: the main process's
        event loop, busy feeding the pool, would delay every batch's reply), and a
        thread of the main process that starts another if it dies."""
        self._fork()
        threading.Thread(target=self._watch, name="pgqueue-completions-watch", daemon=True).start()
        return self

    def _fork(self) -> None:
        pid = os.fork()
        if pid == 0:  # the writer process
            code = 0
            try:
                # Not the worker's handlers it inherited (SIGHUP would re-exec a worker
                # here), and not SIGTERM either: a stop sent to the whole process group
                # (systemd's default) would end it while the pool's last tasks finish.
                # The main process decides, and stops it with a message (stop()).
                for signum in (
                    signal.SIGINT,
                    signal.SIGHUP,
                    signal.SIGTERM,
                    signal.SIGUSR1,
                    signal.SIGUSR2,
                ):
                    signal.signal(signum, signal.SIG_IGN)
                signal.signal(signal.SIGQUIT, signal.SIG_DFL)
                self.serve()
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        self.pid = pid
        self.sock.close()  # the main process never reads it
        logger.info("pgqueue completion writer started (pid %d)", pid)

    def _watch(self) -> None:
        """Reap the writer process; if it died while the worker runs (killed, out of
        memory), start another on the same address and token, so the pool processes,
        which learnt both when they forked, go on handing their finishes to it."""
        while True:
            pid = self.pid
            if pid is None:
                return
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                return  # reaped by stop()
            except InterruptedError:
                continue
            if self._stopped:
                return
            now = time.monotonic()
            self.exits = [t for t in self.exits if now - t < RESTART_WINDOW] + [now]
            if len(self.exits) > RESTARTS:
                logger.error(
                    "pgqueue's completion writer exited %d times in %.0f s; pool processes "
                    "now write their own finishes",
                    len(self.exits),
                    RESTART_WINDOW,
                )
                self.pid = None
                return
            code = os.waitstatus_to_exitcode(status)
            logger.warning(
                "pgqueue's completion writer (pid %d) %s; starting another",
                pid,
                f"was killed by signal {-code}" if code < 0 else f"exited with code {code}",
            )
            try:
                self.sock = self._bind()
                self._fork()
            except OSError as exc:
                logger.error("pgqueue could not restart the completion writer: %s", exc)
                self.pid = None
                return

    def stop(self) -> None:
        """Let the writer process write what has arrived, then reap it."""
        self._stopped = True
        if self.pid is None:
            self.stopping.set()
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(5)  # a full socket buffer drains in milliseconds
                sock.sendto(relay.encode_stop(self.token), self.address)
        except OSError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # not reachable: it writes nothing more
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
                time.sleep(0.05)
                continue
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


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

AUTO_POOL = 8
"""Pool processes from which a node batches its finishes when ``batch_finishes`` is not
set. Measured on a 2-core machine (README, "Scaling out"): at ``-c 8`` the drain is as
fast or faster with the writer, on 5 sessions instead of 12; at ``-c 4`` and ``-c 2``
the extra hop made it 0.84x and 0.88x."""

_writer: CompletionWriter | None = None
_app: Any = None
_processes = 0
"""The node's pool size (its ``--autoscale`` maximum), from ``worker_init``."""
_lock = threading.Lock()


def _before_fork(sender: Any = None, **_: Any) -> None:
    """Start this node's writer before its first pool process forks, if it is wanted."""
    global _writer
    with _lock:
        if _writer is not None and _writer.owner == os.getpid():
            return
        app = _app or _current_app()
        conf = getattr(app, "conf", None)
        raw = getattr(conf, "result_backend_transport_options", None) or {}
        if not _batches(raw.get("batch_finishes")):
            return  # off: not even the backend is touched before a fork
        backend: Any = getattr(app, "backend", None)
        options = getattr(backend, "options", None)
        if not getattr(backend, "settles_jobs", False) or options is None:
            return
        if not _batches(options.batch_finishes):  # parsed: "false" is False here
            return
        try:
            writer = CompletionWriter(backend.store, notify=options.use_notify).start_process()
        except OSError as exc:
            # The pool processes then write their own finishes, as with the option off.
            logger.warning("pgqueue could not start the completion writer: %s", exc)
            return
        _writer = writer
        relay.serve_at(writer.endpoint)


def _batches(setting: object) -> bool:
    """Whether ``batch_finishes`` set to ``setting`` means a writer for this node."""
    return _processes >= AUTO_POOL if setting is None else bool(setting)


def _at_worker_init(sender: Any = None, **_: Any) -> None:
    global _app, _processes
    _app = getattr(sender, "app", None)
    sizes = (getattr(sender, "max_concurrency", None), getattr(sender, "concurrency", None))
    _processes = max((n for n in sizes if isinstance(n, int)), default=0)


def _current_app() -> Any:
    from celery import current_app

    return current_app._get_current_object()


def _after_fork_in_child(**_: Any) -> None:
    """A pool process owns no writer: that is its parent's to stop."""
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
