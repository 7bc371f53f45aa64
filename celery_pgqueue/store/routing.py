"""Queues and routing: declaring, pausing and expiring queues; exchanges and bindings."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from celery_pgqueue.errors import ConfigurationError, InvalidQueueName, UnknownQueue
from celery_pgqueue.store import bindings as binding_sql
from celery_pgqueue.store import queues as queue_sql
from celery_pgqueue.store import schema as schema_sql
from celery_pgqueue.store.connection import Connections

MAX_QUEUE_NAME = 100
MAX_QUEUES_SHOWN = 20  # in the error for an unknown queue


def check_queue_name(name: str) -> str:
    """Queue names are values in ``job_queues.name``: 1-100 characters, no NUL."""
    if not isinstance(name, str) or not name or len(name) > MAX_QUEUE_NAME or "\x00" in name:
        shown = name if not isinstance(name, str) else name[:40] + ("…" if len(name) > 40 else "")
        raise InvalidQueueName(
            f"queue name {shown!r} is not allowed: use 1 to {MAX_QUEUE_NAME} characters "
            f"without NUL (got {len(name) if isinstance(name, str) else type(name).__name__})"
        )
    return name


class Routing(Connections):
    """Queues (created on first use, paused, re-prioritised) and Kombu's bindings."""

    def ensure_queues(self, names: Sequence[str], conn: sa.Connection | None = None) -> None:
        """Create queues on first use (default priority from the options).

        Names are remembered only once our own transaction committed: a caller's
        transaction may still roll the new queue back.
        """
        if conn is not None:
            checked = [check_queue_name(n) for n in names]
            with self.begin(conn) as c:
                queue_sql.ensure(c, names=checked, default_priority=self.options.default_priority)
            return
        missing = [check_queue_name(n) for n in names if n not in self._known_queues]
        if not missing:
            return
        with self.begin() as c:
            queue_sql.ensure(c, names=missing, default_priority=self.options.default_priority)
        self._known_queues.update(missing)

    def set_queue_active(self, name: str, active: bool) -> None:
        """Pause or resume a queue; resuming wakes the workers."""
        with self.begin() as conn:
            if not queue_sql.set_active(conn, name=name, active=active):
                raise self.unknown_queue(name)
            if active and self.options.use_notify:
                schema_sql.notify(conn, channel=self.channel, payload=name)

    def set_queue_priority(self, name: str, priority: int) -> None:
        """Set the ``default_priority`` of a queue's jobs that name none."""
        with self.begin() as conn:
            if not queue_sql.set_default_priority(conn, name=name, priority=priority):
                raise self.unknown_queue(name)

    def set_queue_limit(self, name: str, limit: int | None) -> None:
        """Let at most ``limit`` jobs of ``name`` run at once across every worker.

        None removes the limit; 0 holds the queue's jobs back. The workers are woken,
        so a raised or removed limit fills the new slots at once.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise ConfigurationError(
                f"concurrency limit must be a whole number or None (got {limit!r})"
            )
        if limit is not None and limit < 0:
            raise ConfigurationError(
                f"concurrency limit must be 0 or more (got {limit}); "
                "use none (None in Python) to remove it"
            )
        with self.begin() as conn:
            if not queue_sql.set_concurrency_limit(conn, name=name, limit=limit):
                raise self.unknown_queue(name)
            if self.options.use_notify:
                schema_sql.notify(conn, channel=self.channel, payload=name)

    def queue(self, name: str) -> dict[str, Any]:
        """A queue's settings, or UnknownQueue."""
        with self.begin() as conn:
            row = queue_sql.get(conn, name=name)
        if row is None:
            raise self.unknown_queue(name)
        return dict(row)

    def unknown_queue(self, name: str) -> UnknownQueue:
        """The error for a queue that does not exist, naming those that do."""
        with self.begin() as conn:
            existing = queue_sql.names(conn)
        if not existing:
            return UnknownQueue(f"no queue named {name!r} (there are no queues yet)")
        near = difflib.get_close_matches(name, existing, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        shown = ", ".join(repr(n) for n in existing[:MAX_QUEUES_SHOWN])
        if len(existing) > MAX_QUEUES_SHOWN:
            shown += f" and {len(existing) - MAX_QUEUES_SHOWN} more"
        return UnknownQueue(f"no queue named {name!r}{hint} (queues: {shown})")

    def queues(self) -> list[dict[str, Any]]:
        """Every queue's settings."""
        with self.begin() as conn:
            return [dict(r) for r in queue_sql.list_all(conn)]

    # -- routing (exchanges, bindings, queue expiry) --------------------------------

    def bind(self, exchange: str, exchange_type: str, routing_key: str, queue_name: str) -> None:
        """Persist a binding so every process routes the same way."""
        self.ensure_queues([queue_name])
        with self.begin() as conn:
            binding_sql.bind(
                conn,
                exchange=exchange,
                exchange_type=exchange_type,
                routing_key=routing_key,
                queue_name=queue_name,
            )

    def unbind(self, exchange: str, routing_key: str, queue_name: str) -> None:
        """Forget one binding."""
        with self.begin() as conn:
            binding_sql.unbind(
                conn, exchange=exchange, routing_key=routing_key, queue_name=queue_name
            )

    def binding_table(self, exchange: str) -> list[tuple[str, str, str]]:
        """``(exchange_type, routing_key, queue_name)`` for each binding of ``exchange``."""
        with self.begin() as conn:
            return [tuple(r) for r in binding_sql.table(conn, exchange=exchange)]

    def set_queue_message_ttl(self, name: str, seconds: float) -> None:
        """Messages published to ``name`` from now on expire after ``seconds`` waiting."""
        with self.begin() as conn:
            queue_sql.set_message_ttl(conn, name=name, seconds=seconds)

    def touch_queues(self, expiries: Sequence[tuple[str, float]]) -> None:
        """Keep queues with an expiry alive while they are consumed."""
        if not expiries:
            return
        with self.begin() as conn:
            binding_sql.touch_queues(conn, expiries=expiries)

    def delete_queue(self, name: str) -> bool:
        """Drop a queue, its waiting messages and its bindings."""
        self._known_queues.discard(name)
        with self.begin() as conn:
            return binding_sql.delete_queue(conn, name=name)

    def queue_exists(self, name: str) -> bool:
        """Whether a queue has been declared."""
        with self.begin() as conn:
            return binding_sql.queue_exists(conn, name=name)
