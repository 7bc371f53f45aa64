"""The poller: when to claim, and delivery to the consumers of one connection.

Like Kombu's Redis ``MultiChannelPoller``, one object per connection serves every
channel. It sleeps on the LISTEN socket (a NOTIFY names the queue that got a job),
claims what the consumers have room for (:meth:`Poller.deliver_ready`), and wakes
itself for the soonest scheduled job. In Celery's event loop it registers the LISTEN
socket, a wake-up socket, a tick callback and a poll timer; synchronous consumers
(``drain_events``) sleep on the LISTEN socket instead. The poll every
``polling_interval`` (ten times that in an event loop with LISTEN working) is the
fallback for a NOTIFY missed. Which of several woken workers claims: :mod:`.herd`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Collection, Iterable
from time import monotonic
from typing import TYPE_CHECKING, Any

from celery_pgqueue.errors import DatabaseUnavailable
from celery_pgqueue.store.listener import (
    Listener,
    claim_note_prefix,
    drained_note,
    wake_note,
)
from celery_pgqueue.transport import draining
from celery_pgqueue.transport.acks import ACK_DELAY
from celery_pgqueue.transport.due import DueTimes
from celery_pgqueue.transport.herd import LISTEN_POLL_FACTOR, Herd

if TYPE_CHECKING:
    from celery_pgqueue.transport.transport import Transport

# Most rows one claim takes when the consumer sets no prefetch limit.
MAX_BATCH = 100
# Seconds a consumer with work in hand waits for half its prefetch to come free before
# it claims what room it has: batches for short tasks, no idle process next to long ones.
BATCH_WAIT = 0.05
# Seconds after a short claim of a queue with a concurrency limit before one more
# claim of it. A finish wakes the workers only when it frees a slot of a full queue,
# and judges fullness as its statement began: a claim that filled the queue meanwhile
# goes unseen, and that finish's slot would wait for the poll timer. Such a finish
# commits within milliseconds of the claim; this second look takes its slot.
LIMIT_RECHECK = 0.05


class Poller:
    """Claims and delivers for one connection's consumers (see the module)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._listener: Listener | None = None
        self._pid = os.getpid()
        self._wanted = True
        self._drained: set[str] = set()
        self._rotation = itertools.count()
        self._loop: Any = None
        self._nudge: tuple[socket.socket, socket.socket] | None = None
        self._nudge_pending = False
        self._poll_timer: Any = None
        self._batch_wait_since: float | None = None
        # Limited queues a synchronous consumer claims from again after LIMIT_RECHECK.
        self._rechecks: set[str] = set()
        # When each queue's next scheduled job comes due, and whether to ask again.
        self.due = DueTimes(self)
        self._schedule_stale = True
        self.herd = Herd(self)
        self.batch_wait, self.limit_recheck = BATCH_WAIT, LIMIT_RECHECK  # for draining.py
        self._ack_timer: Any = None
        self._polls = 0

    @property
    def listener(self) -> Listener:
        if self._listener is None or self._pid != os.getpid():
            self._pid = os.getpid()
            transport = self.transport
            self._listener = Listener(
                transport.url,
                [transport.store.channel],
                connect_timeout=transport.options.connect_timeout,
            )
        return self._listener

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()

    # -- delivery --------------------------------------------------------------------

    def deliver_ready(self) -> int:
        """Claim and deliver what our consumers have room for; returns how many.

        Sets ``_wanted`` when more may be waiting (a full batch, or no room yet), so the
        event loop's tick comes back without waiting for a NOTIFY or the poll timer.
        """
        claims_began = monotonic()
        delivered = 0
        wanted = False
        for channel in list(self.transport.channels):
            if not channel._consumers or channel.closed:
                continue
            queues = list(channel._active_queues)
            if not queues:
                continue
            start = next(self._rotation) % len(queues)
            for queue in queues[start:] + queues[:start]:
                if queue in self._drained:
                    # It came back short last time: only a NOTIFY naming it or the poll
                    # timer sends us there again (a worker's mailbox is nearly always
                    # empty, and asking it every round doubled the statements per task).
                    continue
                qos = channel.qos
                if not qos.can_consume():
                    self._batch_wait_since = None  # no room: nothing to wait for yet
                    wanted = True
                    break
                room = qos.can_consume_max_estimate()
                if (
                    room
                    and qos.has_unacked()
                    and room < max(1, qos.prefetch_count // 2)
                    and not self._batch_wait_over()
                ):
                    # Work is still in hand: wait briefly for half the prefetch to be
                    # free and claim those together, instead of one commit per finished
                    # task. Briefly: with a prefetch of one per process (the setting
                    # for priorities) the others may run long tasks.
                    wanted = True
                    break
                limit = min(room, MAX_BATCH) if room else MAX_BATCH
                self._batch_wait_since = None
                woken = queue in self.herd.woken and self.herd.report(queue)
                self.herd.woken.discard(queue)
                drained = claim_note_prefix(queue, self.transport.owner) if woken else None
                got = channel.claim_into(queue, limit, drained)
                delivered += got
                if got >= limit:
                    wanted = True
                else:
                    self._drained.add(queue)
                    if got and self.transport.store.is_limited(queue):
                        self._recheck(queue)  # this claim may have filled the queue
        self.transport.acks.flush()
        self._wanted = wanted
        if self._schedule_stale:
            # After the claims, and with the event loop after what they delivered has
            # gone to the pool (a countdown task starts a round trip sooner); so the
            # look-up also counts jobs that came due since the claims began: each is
            # either claimed or in the answer, never missed by both.
            if delivered and self._loop is not None:
                self._schedule_stale = False
                self._loop.call_soon(self.due.look_up, claims_began)
            else:
                self.due.look_up(claims_began)
        return delivered

    def _recheck(self, queue: str) -> None:
        """Claim from a limited ``queue`` once more after ``LIMIT_RECHECK``."""
        if self._loop is not None:
            self._loop.call_later(LIMIT_RECHECK, self._on_recheck, queue)
        else:
            self._rechecks.add(queue)

    def _on_recheck(self, queue: str) -> None:
        self._drained.discard(queue)
        self._wanted = True
        self._wake_loop()

    def _batch_wait_over(self) -> bool:
        """Whether room has waited ``BATCH_WAIT`` for more; starts the wait (and a
        wake-up at its end, in an event loop) the first time it is asked."""
        now = monotonic()
        if self._batch_wait_since is None:
            self._batch_wait_since = now
            if self._loop is not None:
                self._loop.call_later(BATCH_WAIT, self._on_batch_wait)
            return False
        return now - self._batch_wait_since >= BATCH_WAIT

    def _on_batch_wait(self) -> None:
        if self._batch_wait_since is not None:
            self._wanted = True
            self._wake_loop()

    # -- waking for scheduled jobs (see due.py) --------------------------------------

    def _consumed_queues(self) -> set[str]:
        return {
            queue
            for channel in list(self.transport.channels)
            if channel._consumers and not channel.closed
            for queue in channel._active_queues
        }

    def _came_due(self, queues: Collection[str] = ()) -> None:
        """Scheduled jobs are due: claim again, then ask for the next ones. ``queues``:
        the queues they came due in (their claims report a drain); none given, every
        queue is claimed from (a synchronous consumer, which keeps no time per queue)."""
        self.due.next = None
        if queues:
            self._drained.difference_update(queues)
        else:
            self._drained.clear()
        self.herd.woken.update(queues)
        self._wanted = True
        self._schedule_stale = True

    def _take_notes(self, notes: Iterable[tuple[str, str]]) -> bool:
        """Apply NOTIFY payloads; True when one says jobs are due now."""
        due = False
        consumed: set[str] | None = None
        fresh: set[str] = set()  # queues a NOTIFY of this batch sends us to claim
        for _, payload in notes:
            note = drained_note(payload)
            if note is not None:
                queue, owner, began = note
                if self.herd.drained(queue, owner, fresh, began):
                    continue
                payload = queue  # an empty owner hands the turn on: a wake-up
            queue, seconds, run_at = wake_note(payload)
            # Always read as a queue name too: a name may contain the marks.
            if payload in self._drained:
                if self.herd.hold(payload):
                    continue
                fresh.add(payload)
                self.herd.woken.add(payload)
                self._drained.discard(payload)
            if seconds is None:
                due = True
                continue
            consumed = self._consumed_queues() if consumed is None else consumed
            if queue in consumed:
                self.due.hint(queue, seconds, run_at)
        return due

    # -- synchronous consumers -------------------------------------------------------

    def drain_events(self, timeout: float | None = None) -> None:
        """Synchronous consumers: deliver, else sleep on the LISTEN socket."""
        draining.drain_events(self, timeout)

    # -- the event loop ----------------------------------------------------------------

    def register_with_event_loop(self, loop: Any) -> None:
        """Sleep on the LISTEN socket; tick and a poll timer cover the rest."""
        self._loop = loop
        if self.transport.options.use_notify:
            loop.add_reader(self.listener.fileno(), self._on_readable)
        if self._nudge is None:
            self._nudge = socket.socketpair()
            for end in self._nudge:
                end.setblocking(False)
        loop.add_reader(self._nudge[0].fileno(), self._on_nudged)
        loop.on_tick.add(self._on_tick)
        # With LISTEN only every LISTEN_POLL_FACTOR-th tick polls (see herd.py).
        self._poll_timer = loop.call_repeatedly(
            self.transport.polling_interval, self._on_poll_timer
        )
        self._wanted = True
        self.due.cancel()
        self._schedule_stale = True  # learn the soonest scheduled job on the first tick
        self.transport.start_background()

    def unregister_from_event_loop(self, loop: Any) -> None:
        with contextlib.suppress(Exception):
            if self._listener is not None and self._listener.connected:
                loop.remove_reader(self._listener.fileno())
        loop.on_tick.discard(self._on_tick)
        if self._nudge is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self._nudge[0].fileno())
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        self.due.cancel()
        self.herd.cancel_all()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def _listen_dropped(self) -> None:
        """Whatever ended the LISTEN session (a restart, a failover, an administrator)
        most likely ended the pool's idle sessions too: drop them now, so the consumer's
        reconnect starts on fresh sessions instead of failing, and restarting, once more
        on a stale one."""
        with contextlib.suppress(Exception):
            self.transport.store.dispose()

    def _on_readable(self, *args: Any) -> None:
        try:
            notes = self.listener.drain()
        except DatabaseUnavailable:
            self._listen_dropped()
            raise
        if notes and self._take_notes(notes):
            self._wanted = True
            if self.deliver_ready():
                # A task with an eta goes through Celery's timer (due at once, see
                # clock.py): have the hub fire it now, not after this round's poll.
                self._wake_loop()

    def _on_tick(self) -> None:
        if not self._wanted:
            self.transport.acks.flush()
            return
        if self.deliver_ready():
            # on_tick callbacks run in no set order: the pool's own on_tick may already
            # have registered its writers for this round, and the hub would then sleep
            # until its next timer with our jobs unsent. Waking our socket makes the
            # poll return at once, so the next round starts them.
            self._wake_loop()

    def room_freed(self) -> None:
        """An ack made room: if deliveries wait for it, have the event loop come back.

        Celery runs acks as the hub's ready callbacks, after the tick that found no
        room; without a wake-up the loop would sleep until the poll timer (a solo
        pool, whose tasks run inside the loop, did one batch per poll interval).
        """
        if self._wanted:
            self._wake_loop()
        if self._loop is not None and self._ack_timer is None and self.transport.acks.pending():
            # No claim may come soon to carry the ack, and the poll timer is 10 s away.
            self._ack_timer = self._loop.call_later(ACK_DELAY * 1.5, self._on_ack_timer)

    def _on_ack_timer(self) -> None:
        self._ack_timer = None
        self.transport.acks.flush()

    def _wake_loop(self) -> None:
        """Make the hub's poll return at once; one pending wake-up byte is enough."""
        if self._nudge is None or self._nudge_pending:
            return
        self._nudge_pending = True
        with contextlib.suppress(BlockingIOError):
            self._nudge[1].send(b"\0")

    def _on_nudged(self, *args: Any) -> None:
        self._nudge_pending = False
        with contextlib.suppress(BlockingIOError):
            self._nudge[0].recv(4096)  # type: ignore[index]

    def _on_poll_timer(self) -> None:
        self._polls += 1
        if self.transport.options.use_notify and self._polls % LISTEN_POLL_FACTOR:
            # LISTEN works: only queues with a concurrency limit, whose freed slots a
            # finish may not announce (see LIMIT_RECHECK), are looked at every time.
            store = self.transport.store
            limited = [queue for queue in self._drained if store.is_limited(queue)]
            if limited:
                self._drained.difference_update(limited)
                self.deliver_ready()
            return
        self._drained.clear()  # the fallback: a NOTIFY may have been missed
        if not self.transport.options.use_notify:
            self._schedule_stale = True  # no publish tells us of sooner jobs
        self.deliver_ready()
