"""Synchronous consumers (``drain_events()`` without an event loop: Flower, ``celery
events``, a Kombu ``ConsumerMixin`` or ``SimpleQueue`` loop): deliver, else sleep on the
LISTEN socket for at most ``polling_interval``, then look again.

Apart from :mod:`.poller` (whose state it reads and sets) only to keep that module
short. No herd logic here (:mod:`.herd`): a synchronous consumer claims at once on a
NOTIFY, and polls every ``polling_interval`` even while LISTEN works.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING

from celery_pgqueue.errors import DatabaseUnavailable

if TYPE_CHECKING:
    from celery_pgqueue.transport.poller import Poller


def drain_events(poller: Poller, timeout: float | None = None) -> None:
    """Deliver, else sleep on the LISTEN socket (at most ``polling_interval``)."""
    deadline = None if timeout is None else monotonic() + timeout
    while True:
        if poller.deliver_ready():
            return
        remaining = poller.transport.polling_interval
        if poller._batch_wait_since is not None:
            remaining = min(remaining, poller.batch_wait)
        if poller._rechecks:
            remaining = min(remaining, poller.limit_recheck)
            poller._drained.difference_update(poller._rechecks)
            poller._rechecks.clear()
        if poller.due.next is not None:
            remaining = min(remaining, max(0.0, poller.due.next - monotonic()))
        if deadline is not None:
            left = deadline - monotonic()
            if left <= 0:
                raise TimeoutError()
            remaining = min(remaining, left)
        _sleep(poller, remaining)
        if poller.due.next is not None and monotonic() >= poller.due.next:
            poller._came_due()


def _sleep(poller: Poller, seconds: float) -> None:
    if not poller.transport.options.use_notify:
        poller.transport.stopping.wait(seconds)
        poller._drained.clear()
        poller._schedule_stale = True
        return
    try:
        notes = poller.listener.wait(seconds)
    except DatabaseUnavailable:
        poller._listen_dropped()
        raise
    if notes:
        poller._take_notes(notes)
    else:
        poller._drained.clear()
