"""Acks, rejects and restores on the rows, and deliveries kept across a consumer restart.

Unacked means a row in ``running`` under our lease, not an entry in memory only, so a
crashed worker loses nothing: rescue puts its rows back. When Celery's consumer
restarts after a lost connection the process lives on, and so do the tasks its pool
is running: their deliveries are kept (``QoS.kept``), their leases renewed and their
acks still written, instead of being put back in line while they run.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from multiprocessing.util import Finalize
from time import monotonic
from typing import Any

from kombu.transport import virtual

from celery_pgqueue.transport.messages import held_of

logger = logging.getLogger("celery_pgqueue")

# Channels closed by a lost connection whose deliveries the worker's pool still runs.
_detached: weakref.WeakSet[QoS] = weakref.WeakSet()


def detached_held() -> list[tuple[uuid.UUID, int]]:
    """Deliveries kept across a consumer restart (see ``QoS.restore_unacked``).

    The lease keeper renews them with the ones it holds itself: a task handed to the
    pool before the restart may wait there for longer than a lease.
    """
    held: list[tuple[uuid.UUID, int]] = []
    for qos in list(_detached):
        held.extend(qos.kept_held())
    return held


def _pool_tags(qos: QoS) -> tuple[set[str], set[str]]:
    """Delivery tags of ``qos`` the worker's pool has: (started, handed over, not started).

    Requests waiting for a free process (prefork's semaphore), an ETA or a rate limit
    are dropped by Celery at a consumer restart: in neither set.
    """
    try:
        from celery.worker import state as worker_state
    except ImportError:  # pragma: no cover - a Kombu application without Celery
        return set(), set()
    started: set[str] = set()
    handed: set[str] = set()
    active = set(worker_state.active_requests)
    for request in list(worker_state.reserved_requests) + list(active):
        message: Any = getattr(request, "message", None)
        if getattr(message, "channel", None) is not qos.channel:
            continue
        if request in active:
            started.add(message.delivery_tag)
        elif getattr(request, "_apply_result", None) is not None:
            handed.add(message.delivery_tag)
    return started, handed - started


class QoS(virtual.QoS):  # type: ignore[misc]
    """Acks, rejects and restores act on the rows, fenced by (job id, attempt).

    Unacked means a row in ``running`` under our lease, not an entry in memory only,
    so a crashed worker loses nothing: rescue puts its rows back.
    """

    def __init__(self, channel: Any, prefetch_count: int = 0) -> None:
        super().__init__(channel, prefetch_count)
        # Deliveries the pool still runs after the connection was lost, with when they
        # were kept: their later ack or reject still reaches the row.
        self.kept: dict[str, tuple[Any, float]] = {}

    def _take(self, delivery_tag: str) -> Any:
        message = self._delivered.get(delivery_tag)
        if message is None:
            kept = self.kept.pop(delivery_tag, None)
            message = kept[0] if kept else None
        return message

    def ack(self, delivery_tag: str) -> None:
        message = self._take(delivery_tag)
        if message is not None:
            self.channel._settle_ack(message)
        super().ack(delivery_tag)
        self.channel.transport.poller.room_freed()

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        message = self._take(delivery_tag)
        if message is not None:
            if requeue:
                self.channel._requeue([message])
            else:
                self.channel._settle_reject(message)
        self._quick_ack(delivery_tag)
        self.channel.transport.poller.room_freed()

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Put every unacked delivery back in line in one statement (warm shutdown).

        After a lost connection (Celery's consumer restarts; the process lives on)
        the deliveries the pool still runs stay claimed instead: requeued, another
        worker would start them while they run here. Their lease is renewed and their
        ack still written (see ``kept``); the rest go back in line.

        When the database is unreachable (why a worker's connection usually closes with
        deliveries in hand) nothing is lost: the rows stay claimed under our lease and
        rescue requeues them when it runs out. Kombu would log a panic and pickle the
        messages, payloads included, into a file in /tmp on every restart of the
        server; a warning says what happens instead.
        """
        self._flush()
        messages = list(self._delivered.values())
        self._delivered.clear()
        if messages and self.channel.transport.connection_lost:
            started, handed = _pool_tags(self)
            running = started | handed
            now = monotonic()
            self.kept.update(
                (tag, (m, now)) for m in messages if (tag := m.delivery_tag) in running
            )
            messages = [m for m in messages if m.delivery_tag not in running]
            if self.kept:
                _detached.add(self)
                # At exit whatever the pool never acked (cancelled by a shutdown) goes
                # back in line, as Kombu's own restore at close would have done.
                self._kept_at_exit = Finalize(self, self._restore_kept, exitpriority=1)
        if not messages:
            return []
        self._requeue_or_warn(messages)
        return []

    def kept_held(self) -> list[tuple[uuid.UUID, int]]:
        """Kept deliveries whose leases are still ours to renew.

        Those the pool has started, and those handed to it less than ``lease_seconds``
        ago. Prefork starts a handed task within milliseconds, but a restart can drop
        a hand-over half written (Celery resets the event loop): one not started by
        then goes back in line rather than being renewed for as long as we live.
        """
        if not self.kept:
            return []
        try:
            started, _ = _pool_tags(self)
        except RuntimeError:  # Celery's sets changed while read: decide next time
            return [held_of(message) for message, _ in list(self.kept.values())]
        grace = self.channel.transport.options.lease_seconds
        now = monotonic()
        held, stale = [], []
        for tag, (message, since) in list(self.kept.items()):
            if tag in started or now - since < grace:
                held.append(held_of(message))
            elif self.kept.pop(tag, None) is not None:
                stale.append(message)
        if stale:
            logger.warning(
                "pgqueue: %d task(s) handed to the pool before a consumer restart never"
                " started within %s s; putting them back in line: %s",
                len(stale),
                grace,
                ", ".join(str(held_of(m)[0]) for m in stale),
            )
            self._requeue_or_warn(stale)
        return held

    def _restore_kept(self) -> None:
        messages = [message for message, _ in self.kept.values()]
        self.kept.clear()
        if messages:
            self._requeue_or_warn(messages)

    def _requeue_or_warn(self, messages: list[Any]) -> None:
        try:
            self.channel._requeue(messages)
        except Exception as exc:
            logger.warning(
                "pgqueue could not put %d claimed messages back now (%s); they return to"
                " their queue when their lease runs out (lease_seconds=%s); job ids: %s",
                len(messages),
                exc,
                self.channel.transport.options.lease_seconds,
                ", ".join(str(held_of(m)[0]) for m in messages),
            )

    def has_unacked(self) -> bool:
        """Whether deliveries are still waiting for their ack (work in hand)."""
        return len(self._delivered) > len(self._dirty)

    def held(self) -> list[tuple[uuid.UUID, int]]:
        """Deliveries not yet acked, read from another thread (the lease keeper).

        Raises if the consumer's thread kept changing them; the keeper then renews
        what it read last and says so, rather than letting those leases lapse.
        """
        for attempt in range(3):
            try:
                dirty = set(self._dirty)
                return [held_of(m) for tag, m in list(self._delivered.items()) if tag not in dirty]
            except RuntimeError:  # changed size during iteration
                if attempt == 2:
                    raise
        return []
