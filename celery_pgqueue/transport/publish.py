"""Many publishes, one INSERT: Kombu's publish batches.

Kombu 5.7's ``Producer.batch()`` asks the channel for a batch session
(:meth:`Channel.create_publish_batch`). Each publish inside it is routed and checked
at the call (an oversized or unroutable message raises there), and its rows wait in
memory until the batch flushes: one INSERT per ``max_size`` rows, all-or-nothing. A
batch left by an exception publishes nothing that was not flushed. Celery's groups
use it through :mod:`celery_pgqueue.batching`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery_pgqueue.store import NewJob
    from celery_pgqueue.transport.channel import Channel


class PublishBatch:
    """A channel's pending rows for one ``Producer.batch()`` (Kombu's session API)."""

    def __init__(self, channel: Channel, max_size: int) -> None:
        self.channel = channel  # Kombu checks that the producer's channel stays the same
        self.max_size = max_size
        self._pending: list[NewJob] = []
        self._closed = False

    def publish(self, message: dict[str, Any], **kwargs: Any) -> None:
        """Route ``message`` now; its rows are inserted at the next flush."""
        if self._closed:
            raise RuntimeError("pgqueue: publish through a closed batch")
        self.channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, jobs: list[NewJob]) -> None:
        """Rows built by :meth:`Channel.basic_publish` for one message."""
        self._pending.extend(jobs)
        if len(self._pending) >= self.max_size:
            self.flush()

    def flush(self) -> None:
        """Insert every pending row in one statement."""
        pending, self._pending = self._pending, []
        if pending:
            self.channel.enqueue(pending)

    def discard(self) -> None:
        """Forget rows not yet flushed (the batch was left by an exception)."""
        self._pending = []

    def close(self) -> None:
        self._pending = []
        self._closed = True


@contextlib.contextmanager
def collecting(channel: Channel, max_size: int) -> Iterator[PublishBatch]:
    """``Producer.batch()`` for Kombu before 5.7: the channel batches its own publishes.

    Flushed when the block ends, discarded if it raises; a block inside another one
    adds to the outer batch.
    """
    if channel.open_batch is not None:
        yield channel.open_batch
        return
    batch = channel.create_publish_batch(max_size)
    channel.open_batch = batch
    try:
        yield batch
        channel.open_batch = None
        batch.flush()
    finally:
        channel.open_batch = None
        batch.close()
