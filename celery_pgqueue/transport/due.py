"""Waking for scheduled jobs: when each of a worker's queues next has a job come due.

A job with a countdown becomes due without any NOTIFY. The worker asks the database
how long until the soonest scheduled job of each of its queues (an interval on the
database's clock, waited out on our monotonic one) and sets a timer for the soonest;
a publish of a sooner one says so in its NOTIFY and moves that queue's time earlier.
A worker with peers on a queue lets one of them claim what came due, and takes the
next time from that peer's look-up (see :mod:`.herd`). The poll every
``polling_interval`` stays the fallback. Apart from :mod:`.poller`, whose claims it
starts, only to keep that module short.
"""

from __future__ import annotations

import math
from time import monotonic
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery_pgqueue.transport.poller import Poller

# Seconds added to the time the claims took when the look-up that follows them asks
# for jobs that came due meanwhile (a look-up sent later than measured). Small: a job
# in that window that we cannot claim (paused queue, no room) wakes us again at once.
LOOKUP_SLACK = 0.005
# Seconds a worker whose due jobs a peer's claim covered waits for that peer's look-up
# to tell it the next due time, before it asks the database itself.
AWAIT_TELL = 1.0


class DueTimes:
    """One poller's due times per queue and the timer for the soonest (see the module)."""

    def __init__(self, poller: Poller) -> None:
        self.poller = poller
        self.times: dict[str, tuple[float, float | None]] = {}
        """Per queue: when its soonest scheduled job comes due (monotonic) and that
        job's run_at on the database's clock when a look-up said so (else None)."""
        self.awaiting: dict[str, float | None] = {}
        """Queues whose next due time a peer's look-up is to tell us (see
        :meth:`await_tell`), with the soonest a publish announced meanwhile."""
        self.next: float | None = None
        """The soonest of :attr:`times` (monotonic), which a synchronous consumer waits for."""
        self._timer: Any = None

    def look_up(self, claims_began: float) -> None:
        """Ask the database when the soonest scheduled job of each of our queues comes
        due, counting jobs that came due since ``claims_began`` (monotonic); tell our
        peers the answer for the queues we share with them."""
        poller = self.poller
        poller._schedule_stale = False
        queues = sorted(poller._consumed_queues())
        within = monotonic() - claims_began + LOOKUP_SLACK
        tell = [queue for queue in queues if poller.herd.tells(queue)]
        answer = poller.transport.store.next_due(queues, within, tell) if queues else {}
        now = monotonic()
        self.times = {queue: (now + max(0.0, s), at) for queue, (s, at) in answer.items()}
        self.awaiting.clear()
        self.arm()

    def hint(self, queue: str, seconds: float, run_at: float | None) -> None:
        """A NOTIFY says when a job of ``queue`` comes due: a publish (``run_at`` None)
        or a peer's look-up (``seconds`` infinite: none is scheduled)."""
        now = monotonic()
        if queue in self.awaiting:
            if run_at is None and seconds != math.inf:  # a publish: keep it for later
                hinted = self.awaiting[queue]
                due = now + seconds
                self.awaiting[queue] = due if hinted is None else min(hinted, due)
                return
            # The peer's look-up, or the sooner of it and a publish meanwhile.
            hinted = self.awaiting.pop(queue)
            choices = [] if seconds == math.inf else [(now + seconds, run_at)]
            if hinted is not None:
                choices.append((hinted, None))
            if choices:
                self.times[queue] = min(choices, key=lambda choice: choice[0])
            else:
                self.times.pop(queue, None)
            self.arm()
            return
        if seconds == math.inf:
            return  # a peer's look-up found nothing: our own knowledge stands
        deadline = now + seconds
        current = self.times.get(queue)
        if current is None or deadline < current[0]:
            self.times[queue] = (deadline, run_at)
            self.arm()

    def await_tell(self, queue: str) -> None:
        """A peer's claim covered what came due in ``queue``: wait for that peer's
        look-up to say when the next job comes due, at most ``AWAIT_TELL`` seconds."""
        now = monotonic()
        current = self.times.get(queue)
        hinted = None if current is None else current[0]
        self.awaiting[queue] = hinted
        deadline = now + AWAIT_TELL if hinted is None else min(now + AWAIT_TELL, hinted)
        self.times[queue] = (deadline, None)
        self.arm()

    def arm(self) -> None:
        """Wake when the soonest of :attr:`times` comes due (in an event loop: a timer)."""
        loop = self.poller._loop
        deadline = min((due for due, _ in self.times.values()), default=None)
        if deadline == self.next and (loop is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.next = deadline
        if deadline is not None and loop is not None:
            # No margin needed: both sources are late, never early (a NOTIFY arrives
            # after its commit; the look-up's answer after the database's now()).
            self._timer = loop.call_later(max(0.0, deadline - monotonic()), self._on_due)

    def cancel(self) -> None:
        """Forget every due time (the event loop starts or stops)."""
        self.times.clear()
        self.awaiting.clear()
        self.next = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_due(self) -> None:
        """Claim the queues whose jobs came due, unless a peer's claim is to (herd)."""
        self._timer = None
        self.next = None
        now = monotonic()
        came = {queue: at for queue, (due, at) in self.times.items() if due <= now}
        for queue in came:
            del self.times[queue]
            self.awaiting.pop(queue, None)
        poller = self.poller
        claim = [queue for queue, at in came.items() if not poller.herd.hold_due(queue, at)]
        if claim:
            poller._came_due(claim)
            if poller.deliver_ready():
                poller._wake_loop()  # start it now, not after the hub's next poll timeout
        self.arm()
