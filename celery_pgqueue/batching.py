"""Many publishes, one INSERT: Kombu's publish batches, used for Celery's groups.

Kombu 5.7's ``Producer.batch()`` asks the channel for a batch session
(:meth:`Channel.create_publish_batch`). Each publish inside it is routed and checked
at the call (an oversized or unroutable message raises there), and its rows wait in
memory until the batch flushes: one INSERT per ``max_size`` rows, all-or-nothing. A
batch left by an exception publishes nothing that was not flushed.

Celery's ``group.apply_async`` (and so ``chunks``, and a chord's header) publishes its
tasks one by one through one producer. :func:`install_group_batching` wraps it so that,
when the app's broker is pgqueue, that loop runs inside ``producer.batch()``: a group of
N tasks is one statement instead of N round trips (and N commits outside a caller's
transaction). Other brokers' groups are left exactly as Celery sends them.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery_pgqueue.store import NewJob
    from celery_pgqueue.transport import Channel

#: Rows per INSERT when a group is published (Kombu's own default batch size).
GROUP_BATCH_SIZE = 1000


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


def _is_pgqueue(producer: Any) -> bool:
    from celery_pgqueue.transport import Transport

    connection = getattr(producer, "connection", None)
    transport = getattr(connection, "transport", None) if connection is not None else None
    return isinstance(transport, Transport) and hasattr(producer, "batch")


def _batched(apply_async: Any) -> Any:
    @functools.wraps(apply_async)
    def apply_async_batched(
        self: Any, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any
    ) -> Any:
        app = self.app
        broker = str(app.conf.broker_url or "")
        if rest or app.conf.task_always_eager or not broker.startswith("pgqueue"):
            return apply_async(self, args, kwargs, *rest, **options)
        with app.producer_or_acquire(options.pop("producer", None)) as producer:
            if not _is_pgqueue(producer):
                return apply_async(self, args, kwargs, producer=producer, **options)
            with producer.batch(max_size=GROUP_BATCH_SIZE):
                return apply_async(self, args, kwargs, producer=producer, **options)

    apply_async_batched.__pgqueue_batched__ = True  # type: ignore[attr-defined]
    return apply_async_batched


def install_group_batching(canvas: Any = None) -> None:
    """Publish each pgqueue group in one INSERT (idempotent; Kombu 5.7+).

    Called by the interpreter-start hook as soon as ``celery.canvas`` is imported, and
    again (a no-op then) when the transport is loaded.
    """
    if canvas is None:
        canvas = importlib.import_module("celery.canvas")
    current = canvas.group.apply_async
    if getattr(current, "__pgqueue_batched__", False):
        return
    canvas.group.apply_async = _batched(current)
