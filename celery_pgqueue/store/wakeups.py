"""Fewer wake-up NOTIFYs from a process that publishes fast: many producers, one server.

A publish's NOTIFY fires at its commit, and PostgreSQL lets one notifying transaction
commit at a time: ``PreCommit_Notify`` takes a cluster-wide lock held until the commit
has flushed its WAL. Sixteen producer processes that each notify every publish
therefore commit one after the other (measured: 1.2x the rate of one; without the
NOTIFYs, 2.8x), and sending the NOTIFY in a transaction of its own after the commit
does not help (1.5x): each one still queues for the lock. What helps is fewer of them.

So a process's publish of jobs due now notifies in its own commit only when this
process has not notified that queue within the last :attr:`Wakeups.window`; otherwise
it commits without a NOTIFY and the queue is *owed* one. The next notifying publish
of that queue pays the debt (it commits after the owed ones, so its NOTIFY wakes the
workers to them too); if none comes within the window, a daemon thread sends the
NOTIFY in a transaction of its own, and at interpreter exit anything still owed is
sent. Every committed job is followed by a NOTIFY within a few windows. The thread
pays only once the process has published nothing for a window, on a pooled
connection nobody is using (publishes wait for it meanwhile), so a producer still
holds one connection per thread publishing at once, not one more.

The window follows how long this process's notifying publishes take: about a
millisecond alone, so a steady 100 tasks/s (one every 10 ms) never waits; when
producers queue for the lock their publishes take longer, the window grows (up to
:data:`MAX_WINDOW`), fewer publishes notify, and the rest commit without queueing.
A process killed within a window of its last publish leaves that wake-up to the
workers' safety-net poll. Scheduled jobs (countdown, ETA) always notify in their own
commit: their NOTIFY carries when they come due.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from time import monotonic

logger = logging.getLogger("celery_pgqueue")

WINDOW_FACTOR = 4.0
"""The window is this many times a notifying publish's smoothed duration."""
MIN_WINDOW = 0.001
"""Seconds: the window of a process whose publishes are fast (never below)."""
MAX_WINDOW = 0.05
"""Seconds: however contended, an owed wake-up is sent within this long."""
LOOK_EVERY = 0.005
"""Seconds between the thread's looks for debts while publishes come."""
QUIET = 1.0
"""Seconds without a publish after which the thread sleeps until a debt wakes it."""
SMOOTHING = 0.2
"""Weight of the newest duration in the moving average."""

Send = Callable[[list[str]], None]


class Wakeups:
    """One process's wake-up debts for one database (see the module docstring)."""

    _instances: weakref.WeakSet[Wakeups] = weakref.WeakSet()

    def __init__(self, send: Send, min_window: float = MIN_WINDOW) -> None:
        self._send = send
        self.min_window = min_window
        """Seconds the window never goes below (tests widen it to see a debt paid)."""
        self._reset()
        Wakeups._instances.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._last: dict[str, float] = {}  # queue -> when a NOTIFY of it last went out
        self._owed: set[str] = set()
        self._cost = MIN_WINDOW / WINDOW_FACTOR  # smoothed notifying publish, seconds
        self._thread: threading.Thread | None = None
        self._in_flight = 0  # publishes between notify_now and notified/owe
        self._last_end = 0.0  # when the latest publish ended
        self._sending = False  # the thread is sending: publishes wait for it
        self._asleep = False  # the thread waits for a debt to wake it

    @property
    def window(self) -> float:
        """Seconds within which a queue's second publish does not notify."""
        return max(self.min_window, min(MAX_WINDOW, WINDOW_FACTOR * self._cost))

    def notify_now(self, queues: Iterable[str]) -> bool:
        """Whether a publish to ``queues`` notifies in its own commit.

        True also settles what those queues are owed: every owed publish committed
        before this one asked, so this one's NOTIFY, at its later commit, covers it.
        Report the outcome with :meth:`notified`, or :meth:`owe` if it did not notify
        or failed (what it settled is then owed again).
        """
        names = set(queues)
        with self._lock:
            while self._sending:  # the thread is using the connection we would take
                self._changed.wait()
            self._in_flight += 1
            now = monotonic()
            window = self.window
            if all(now - self._last.get(q, -window) < window for q in names):
                return False
            for q in names:
                self._last[q] = now
            self._owed -= names
            return True

    def notified(self, seconds: float) -> None:
        """A publish that notified in its commit took ``seconds``, round trip included."""
        with self._lock:
            self._cost += SMOOTHING * (seconds - self._cost)
            overdue = self._ended()
        if overdue:
            self._deliver(overdue)

    def owe(self, queues: Iterable[str]) -> None:
        """Publishes to ``queues`` committed without a NOTIFY (or failed): send one soon."""
        with self._lock:
            if self._asleep:
                self._changed.notify_all()  # a first debt after a quiet spell
            self._owed.update(queues)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="celery-pgqueue-wakeups", daemon=True
                )
                self._thread.start()
                _pay_at_exit()
            overdue = self._ended()
        if overdue:
            self._deliver(overdue)

    def _ended(self) -> list[str]:
        """A publish has ended (lock held): debts its thread must pay now, if any.

        The thread pays a debt only once this process has published nothing for a
        window: then a pooled connection is idle for it, where sending while a
        publish is in flight would open one more (a producer would hold two). A busy
        producer settles its queues' debts with its next notifying publishes; one
        that keeps publishing to other queues only pays here, on the connection its
        thread has just given back, a debt a window overdue.
        """
        now = monotonic()
        self._in_flight -= 1
        self._last_end = now
        return self._take_due(now, late_by=self.window)

    def _take_due(self, now: float, late_by: float = 0.0) -> list[str]:
        """Owed queues whose window passed ``late_by`` ago (lock held), marked sent."""
        edge = self.window + late_by
        due = sorted(q for q in self._owed if now - self._last.get(q, -edge) >= edge)
        self._owed.difference_update(due)
        for q in due:
            self._last[q] = now
        return due

    def flush(self) -> None:
        """Send every owed wake-up now (at interpreter exit)."""
        with self._lock:
            due, self._owed = sorted(self._owed), set()
        if due:
            self._deliver(due)

    def _run(self) -> None:
        while True:
            with self._lock:
                due = self._wait_for_due()
                self._sending = True
            try:
                self._deliver(due)
            finally:
                with self._lock:
                    self._sending = False
                    self._changed.notify_all()

    def _wait_for_due(self) -> list[str]:
        """Block until a debt is due and no publish has run for a window (lock held)."""
        while True:
            if not self._owed:
                # While publishes come, look every few milliseconds rather than be
                # woken by every debt (a thread switch per publish costs a fast
                # producer a tenth of its rate); after a quiet second, sleep until
                # a debt wakes it.
                if monotonic() - self._last_end < QUIET:
                    self._changed.wait(LOOK_EVERY)
                else:
                    self._asleep = True
                    self._changed.wait()
                    self._asleep = False
                continue
            now = monotonic()
            window = self.window
            soonest = min(self._last.get(q, now) for q in self._owed) + window
            ready_at = max(soonest, self._last_end + window)
            if self._in_flight == 0 and now >= ready_at:
                due = self._take_due(now)
                if due:
                    return due
            self._changed.wait(max(ready_at - now, window))

    def _deliver(self, queues: list[str]) -> None:
        try:
            self._send(queues)
        except Exception as exc:  # the jobs are committed; the workers' poll finds them
            logger.warning(
                "celery-pgqueue: could not wake the workers of %s (%s); they find the "
                "jobs at their next poll",
                ", ".join(queues),
                exc,
            )

    @classmethod
    def after_fork_in_child(cls) -> None:
        """A forked child owes nothing and has no thread: start afresh."""
        for wakeups in list(cls._instances):
            wakeups._reset()


def _flush_all() -> None:
    for wakeups in list(Wakeups._instances):
        wakeups.flush()


_paying_pid: int | None = None


def _pay_at_exit() -> None:
    """Also pay at the exit of a ``multiprocessing`` child, which skips atexit hooks.

    (Celery's prefork children need none of this: billiard sleeps a second before
    their exit, time enough for the thread.)
    """
    global _paying_pid
    if _paying_pid != os.getpid():
        _paying_pid = os.getpid()
        multiprocessing.util.Finalize(None, _flush_all, exitpriority=0)


atexit.register(_flush_all)
os.register_at_fork(after_in_child=Wakeups.after_fork_in_child)
