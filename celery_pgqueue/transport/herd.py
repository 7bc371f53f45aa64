"""Who claims when a NOTIFY wakes every idle worker of a queue: one at once, not all.

A publish NOTIFYs its queue and every worker LISTENing hears it. If each claimed, a
queue with 24 idle workers would cost the server 24 claims per task, 23 of them
empty. Instead:

* A claim woken by a NOTIFY that takes fewer jobs than it asked for (it drained the
  queue, as its snapshot saw it) sends a *drained* note naming the queue and its
  lease owner, in its own transaction (``claims.CLAIM``'s ``told``): free. A worker
  that knows no peer on the queue sends one only every ``REPORT_ALONE`` seconds, so
  that peers find each other while a lone worker's commits carry almost no NOTIFY.
* The worker that sent the latest drained note of a queue is its *leader*: on the
  next NOTIFY it claims at once. Every other worker that has seen a drained note from
  someone else (so it knows it has peers on that queue) *holds* its claim for a random
  ``HOLD_MIN``..``HOLD_MAX`` seconds and drops it if a drained note from another
  worker arrives meanwhile. A worker alone on its queue (the common case, and every
  worker's own mailbox) never sees a peer's note and always claims at once.
* Why dropping is safe: notifications arrive in commit order, the same for every
  listener. A drained note that follows the NOTIFY of a job comes from a claim that
  either saw the job (took it, or skipped it because a third claim held it), or began
  before the job committed; then its sender reads that NOTIFY only after its claim
  began, and being woken by a NOTIFY it claims once more itself (its own note never
  cancels its claims). Each drop hands the job to a later claim, never to nobody.
* A leader woken while it has no room (its prefetch is full) hands its turn on: one
  NOTIFY with an empty owner, which every worker takes as a wake-up with no leader.
* The same for scheduled jobs, which come due with no NOTIFY: every worker has a
  timer for the soonest. When it fires, the leader claims at once; every other worker
  that knows its peers holds that claim and drops it when a peer's drained note says
  its claim began at or after the ``run_at`` the timer was for (by the database's
  clock, which the note and the look-ups carry): that claim saw every job due then.
  It then waits (``due.AWAIT_TELL`` at most) for the next due time, which the leader's
  look-up after its claim NOTIFYs to its peers (``listener.due_payload``) instead of
  every worker asking the database. A timer set from a publish's NOTIFY, whose
  ``run_at`` the worker does not know, claims at once as before.
* The poll timer stays the safety net, every ``polling_interval`` times
  ``LISTEN_POLL_FACTOR`` while LISTEN works (NOTIFY is the wake-up); a queue with a
  concurrency limit, whose freed slots a finish may not announce, every
  ``polling_interval`` as before.
"""

from __future__ import annotations

import logging
import math
import random
from time import monotonic
from typing import TYPE_CHECKING, Any

from celery_pgqueue.store.listener import drained_payload

if TYPE_CHECKING:
    from celery_pgqueue.transport.poller import Poller

logger = logging.getLogger("celery_pgqueue")

HOLD_MIN = 0.02
"""Shortest hold (seconds) of a worker that is not its queue's leader: longer than a
claim's round trip, so the leader's drained note usually arrives first."""
HOLD_MAX = 0.1
"""Longest hold: the added latency when the leader is busy or gone."""
PEER_MEMORY = 120.0
"""Seconds a peer's drained note is remembered: after that a worker claims at once."""
REPORT_ALONE = 5.0
"""Seconds between drained notes of a worker that knows no peer on the queue: enough
for peers to find each other, and a lone worker's claims mostly carry no NOTIFY."""
LISTEN_POLL_FACTOR = 10
"""A worker LISTENing polls every ``polling_interval`` times this (a safety net only)."""


class Herd:
    """What a worker knows of the others woken with it, per queue (see the module)."""

    def __init__(self, poller: Poller) -> None:
        self.poller = poller
        self.leaders: dict[str, str] = {}
        self._peer_seen: dict[str, float] = {}
        self._reported: dict[str, float] = {}
        self.holds: dict[str, Any] = {}
        """Queues whose claim is held, and the event-loop timer that ends the hold."""
        self.woken: set[str] = set()
        """Queues whose next claim answers a NOTIFY (and so reports a drain)."""
        self.due_holds: dict[str, tuple[float, Any]] = {}
        """Queues whose claim of jobs that came due is held: the latest ``run_at`` it is
        for (database clock), and the event-loop timer that ends the hold."""

    @property
    def me(self) -> str:
        return self.poller.transport.owner

    def has_peers(self, queue: str) -> bool:
        seen = self._peer_seen.get(queue)
        return seen is not None and monotonic() - seen < PEER_MEMORY

    def report(self, queue: str) -> bool:
        """Whether a claim answering a NOTIFY of ``queue`` should carry a drained note:
        always with peers, else every ``REPORT_ALONE`` seconds (so peers find us)."""
        now = monotonic()
        if self.has_peers(queue) or now - self._reported.get(queue, -REPORT_ALONE) >= REPORT_ALONE:
            self._reported[queue] = now
            return True
        return False

    def tells(self, queue: str) -> bool:
        """Whether our look-up of due times NOTIFYs its answer for ``queue``."""
        return self.poller._loop is not None and self.has_peers(queue)

    def drained(self, queue: str, owner: str, fresh: set[str], began: float | None = None) -> bool:
        """Take a drained note; True when it is no wake-up (an empty owner is one).

        A note from another worker cancels our claim of ``queue`` woken by an earlier
        NOTIFY (held, or ``fresh``: due from this batch of notes): that worker's claim
        came later and covers it (see the module). It also cancels a held claim of jobs
        that came due if that claim ``began`` (database clock) when they were due.
        """
        self.leaders[queue] = owner
        if not owner:
            return False
        poller = self.poller
        if owner != self.me and poller._loop is not None:
            self._peer_seen[queue] = monotonic()
            if self.cancel_hold(queue) or queue in fresh:
                fresh.discard(queue)
                self.woken.discard(queue)
                poller._drained.add(queue)
            held = self.due_holds.get(queue)
            if held is not None and began is not None and began >= held[0]:
                del self.due_holds[queue]
                held[1].cancel()
                poller.due.await_tell(queue)
        return True

    def hold_due(self, queue: str, run_at: float | None) -> bool:
        """Whether the claim of ``queue``'s jobs that came due (the soonest at ``run_at``,
        database clock; None: unknown) waits for a peer's claim instead (see the module)."""
        poller = self.poller
        held = self.due_holds.get(queue)
        if held is not None:  # already held: now for the later run_at too
            later = math.inf if run_at is None else max(held[0], run_at)
            self.due_holds[queue] = (later, held[1])
            return True
        if (
            run_at is None
            or poller._loop is None
            or not poller.transport.options.use_notify
            or not self.has_peers(queue)
            or self.leaders.get(queue) == self.me
        ):
            return False
        timer = poller._loop.call_later(
            random.uniform(HOLD_MIN, HOLD_MAX), self._on_due_hold_over, queue
        )
        self.due_holds[queue] = (run_at, timer)
        return True

    def _on_due_hold_over(self, queue: str) -> None:
        """No peer's claim covered them: claim what came due ourselves."""
        if self.due_holds.pop(queue, None) is None:
            return
        poller = self.poller
        poller._came_due([queue])
        if poller.deliver_ready():
            poller._wake_loop()

    def hold(self, queue: str) -> bool:
        """Whether a NOTIFY of the drained ``queue`` waits instead of claiming at once."""
        poller = self.poller
        if poller._loop is None or not poller.transport.options.use_notify:
            return False  # a synchronous consumer claims at once, as before
        if queue in self.holds:
            return True
        if not self.has_peers(queue):
            return False  # alone on the queue: no added latency
        if self.leaders.get(queue) == self.me:
            if not self._room_for(queue):
                self._hand_on(queue)
            return False
        self.holds[queue] = poller._loop.call_later(
            random.uniform(HOLD_MIN, HOLD_MAX), self._on_hold_over, queue
        )
        return True

    def _on_hold_over(self, queue: str) -> None:
        poller = self.poller
        self.holds.pop(queue, None)
        if queue in poller._drained:
            poller._drained.discard(queue)
            self.woken.add(queue)
        poller._wanted = True
        if poller.deliver_ready():
            poller._wake_loop()

    def _room_for(self, queue: str) -> bool:
        return any(
            channel.qos.can_consume()
            for channel in list(self.poller.transport.channels)
            if channel._consumers and not channel.closed and queue in channel._active_queues
        )

    def _hand_on(self, queue: str) -> None:
        """We lead ``queue`` but cannot claim now: wake the others, with no leader."""
        self.leaders[queue] = ""
        try:
            self.poller.transport.store.tell_workers(drained_payload(queue, ""))
        except Exception as exc:  # the poll timer stays the safety net
            logger.debug("pgqueue could not hand on its turn to claim %s: %s", queue, exc)

    def cancel_hold(self, queue: str) -> bool:
        """Drop a held claim of ``queue``; True if there was one."""
        timer = self.holds.pop(queue, None)
        if timer is None:
            return False
        timer.cancel()
        return True

    def cancel_all(self) -> None:
        for queue in list(self.holds):
            self.cancel_hold(queue)
        for _, timer in self.due_holds.values():
            timer.cancel()
        self.due_holds.clear()
