"""Routing: the bindings every process shares, Celery's own names, revoke-to-cancel.

Kombu keeps bindings in memory per connection; here they are rows (``store.bind``),
so a producer routes exactly as the workers that declared the queues. Each process
keeps a copy of an exchange's bindings for ``BINDINGS_TTL`` seconds (a binding made
by this process drops its copy at once).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from time import monotonic
from typing import Any

from celery_pgqueue.ids import job_id_for
from celery_pgqueue.store import Store

# How long a process trusts its copy of an exchange's bindings.
BINDINGS_TTL = 1.0
# Mailbox exchanges (``<app>.pidbox``) carry ``revoke``; we cancel the rows too.
PIDBOX_SUFFIX = ".pidbox"
# Celery's events exchange (``event_exchange``) and the prefix of its receivers' queues.
EVENT_EXCHANGE = "celeryev"


def is_celery_transient(queue: str, exchange: str) -> bool:
    """Celery's own short-lived traffic: remote-control mailboxes and replies, events.

    Recognised by Celery's names (``<app>.pidbox`` and ``reply.<app>.pidbox``
    exchanges, ``*.pidbox`` queues, the ``celeryev`` exchange and its ``celeryev.*``
    queues), never by the lack of a task header: every other message waits until
    consumed, unless it or its queue sets a TTL.
    """
    return (
        exchange.endswith(PIDBOX_SUFFIX)
        or queue.endswith(PIDBOX_SUFFIX)
        or exchange == EVENT_EXCHANGE
        or queue.startswith(EVENT_EXCHANGE + ".")
    )


def is_mailbox(exchange: str) -> bool:
    """A remote-control mailbox exchange, whose ``revoke`` also cancels rows."""
    return bool(exchange) and exchange.endswith(PIDBOX_SUFFIX)


def cancel_revoked(store: Store, message: dict[str, Any]) -> None:
    """``app.control.revoke(id)``: cancel the queued rows too, durably.

    Workers keep revoked ids in memory only; the row's ``cancelled`` status means
    no worker claims it, even after every worker restarted.
    """
    if message.get("content-type") not in ("application/json",):
        return
    body = message.get("body")
    try:
        data = json.loads(body) if isinstance(body, (str, bytes)) else body
    except ValueError:
        return
    if not isinstance(data, dict) or data.get("method") != "revoke":
        return
    task_ids = (data.get("arguments") or {}).get("task_id")
    if isinstance(task_ids, str):
        task_ids = [task_ids]
    if task_ids:
        store.cancel([job_id_for(t) for t in task_ids], revoked=True)


class Bindings:
    """One connection's cache of the stored bindings, per exchange."""

    def __init__(self, store: Callable[[], Store]) -> None:
        self._store = store
        self._tables: dict[str, tuple[float, list[tuple[str, str, str]]]] = {}
        self._types: dict[str, str | None] = {}

    def table(self, exchange: str, channel: Any) -> list[tuple[str, str, str]]:
        """``(routing_key, pattern, queue)`` rows as Kombu's exchange types expect."""
        now = monotonic()
        cached = self._tables.get(exchange)
        if cached and cached[0] > now:
            return cached[1]
        rows = self._store().binding_table(exchange)
        table = []
        for exchange_type, routing_key, queue in rows:
            kind = channel.exchange_types.get(exchange_type)
            if kind is None:
                continue
            table.append(kind.prepare_bind(queue, exchange, routing_key, None))
        self._tables[exchange] = (now + BINDINGS_TTL, table)
        self._types[exchange] = rows[0][0] if rows else None
        return table

    def exchange_type(self, exchange: str) -> str | None:
        """The type an exchange was bound with, by any process (None if unbound)."""
        if exchange not in self._types:
            rows = self._store().binding_table(exchange)
            self._types[exchange] = rows[0][0] if rows else None
        return self._types[exchange]

    def forget(self, exchange: str) -> None:
        """Drop the copy of ``exchange``'s table (this process just changed it)."""
        self._tables.pop(exchange, None)
