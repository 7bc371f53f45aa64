"""Acks: the buffer that batches them onto the next claim, or writes them soon after.

Most early acks of short tasks are written by the next claim statement, or would find
the row already finished; a statement of their own per tick was mostly no-op updates.
Until written the row still reads as unacked, so a worker that dies in that window (at
about ``ACK_DELAY``: an idle event loop arms a timer for it, ``Poller.room_freed``;
a synchronous consumer flushes at its next poll) has the task requeued rather than
marked lost. Consumed messages that are not tasks (mailbox and event traffic) are
deleted instead, at the next flush.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from time import monotonic

from celery_pgqueue.store import Store

logger = logging.getLogger("celery_pgqueue")

# Seconds an early ack may wait to ride on the next claim before it is written alone.
ACK_DELAY = 0.1

Held = tuple[uuid.UUID, int]


class AckBuffer:
    """One connection's acks not yet written, shared by its consumer and background threads."""

    def __init__(self, store: Callable[[], Store]) -> None:
        self._store = store
        # Set once the connection closed: nothing will flush any more, so a late ack
        # (a delivery kept across a consumer restart) is written at once.
        self.closed = False
        self._acks_since = 0.0
        self.after_fork_in_child()

    def after_fork_in_child(self) -> None:
        """New lock, nothing pending: a forked child's acks are the parent's to write."""
        self._lock = threading.Lock()
        self._acks: list[Held] = []
        self._deletes: list[Held] = []

    def pending(self) -> list[Held]:
        """Every ack not yet written (task acks, then deletes)."""
        return self._acks + self._deletes

    def defer(self, held: Held, *, transient: bool) -> None:
        """Queue an ack: it rides on the next claim, or is written within ``ACK_DELAY``."""
        if self.closed:
            # A delivery kept across a consumer restart, acked after this connection
            # closed: nothing will flush for it, so write it now.
            try:
                store = self._store()
                (store.delete_held if transient else store.mark_acked)([held])
            except Exception as exc:
                logger.warning("pgqueue could not record the ack of job %s: %s", held[0], exc)
            return
        with self._lock:
            if transient:
                self._deletes.append(held)
                return
            if not self._acks:
                self._acks_since = monotonic()
            self._acks.append(held)

    def take(self) -> list[Held]:
        """Hand the deferred task acks to a statement that will write them."""
        if not self._acks:
            return []
        with self._lock:
            acks, self._acks = self._acks, []
        return acks

    def give_back(self, acks: list[Held]) -> None:
        """Put acks back after the statement that was to write them failed."""
        if acks:
            with self._lock:
                self._acks[:0] = acks

    def flush(self, force: bool = False) -> None:
        """Write deferred acks: ``acked_at`` for tasks, delete other consumed messages.

        Task acks younger than ``ACK_DELAY`` wait (for a claim to carry them) unless
        ``force``.
        """
        if not (self._acks or self._deletes):
            return
        if not force and not self._deletes and monotonic() - self._acks_since < ACK_DELAY:
            return
        acks = self.take()
        with self._lock:
            deletes, self._deletes = self._deletes, []
        try:
            store = self._store()
            store.mark_acked(acks)
            store.delete_held(deletes)
        except Exception:
            self.give_back(acks)
            with self._lock:
                self._deletes[:0] = deletes
            raise
