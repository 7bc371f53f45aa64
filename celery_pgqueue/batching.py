"""Celery's groups published in one INSERT through Kombu's publish batches.

Celery's ``group.apply_async`` (and so ``chunks``, and a chord's header) publishes its
tasks one by one through one producer. :func:`batched` wraps it so that,
when the app's broker is pgqueue, that loop runs inside ``producer.batch()``
(:mod:`celery_pgqueue.transport.publish`): a group of N tasks is one statement instead
of N round trips (and N commits outside a caller's transaction). Other brokers' groups
are left exactly as Celery sends them.

Installed from one place, the hook (:mod:`celery_pgqueue_hook`), when ``celery.canvas``
is imported; it imports this module only when a pgqueue app's group is first sent. The
hook runs at interpreter start (``celery_pgqueue.pth``) and again on ``import
celery_pgqueue``, so groups are batched without the ``.pth`` too. Nothing in the
transport imports this module.
"""

from __future__ import annotations

import functools
from typing import Any

from celery_pgqueue import unique

#: Rows per INSERT when a group is published (Kombu's own default batch size).
GROUP_BATCH_SIZE = 1000


def _is_pgqueue(producer: Any) -> bool:
    from celery_pgqueue.transport import Transport

    connection = getattr(producer, "connection", None)
    transport = getattr(connection, "transport", None) if connection is not None else None
    return isinstance(transport, Transport)


def _batch(producer: Any) -> Any:
    """Kombu 5.7's ``Producer.batch()``, or the channel's own batch on older Kombu."""
    if hasattr(producer, "batch"):
        return producer.batch(max_size=GROUP_BATCH_SIZE)
    from celery_pgqueue.transport.publish import collecting

    return collecting(producer.channel, GROUP_BATCH_SIZE)


def batched(apply_async: Any) -> Any:
    """``group.apply_async`` publishing in batches (wrapped by the hook, once)."""

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
            with unique.replaced_ids() as replaced, _batch(producer):
                result = apply_async(self, args, kwargs, producer=producer, **options)
            return unique.redirect_group(result, replaced) if replaced else result

    return apply_async_batched
