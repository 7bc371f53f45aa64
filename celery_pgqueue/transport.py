"""pgqueue: a Kombu transport on PostgreSQL's Queue/Jobs tier.

Every message is a row in ``jobs``; a queue is a row in ``job_queues``. Workers claim
due rows with ``FOR UPDATE SKIP LOCKED`` and are woken by LISTEN/NOTIFY.

Features
========
* Type: Virtual
* Supports Direct: Yes
* Supports Topic: Yes
* Supports Fanout: Yes (bindings are stored, so every process routes alike)
* Supports Priority: Yes, lower number runs sooner; none given -> the queue's
  ``default_priority`` (100)
* Supports TTL: Yes (message ``expiration``; queue ``x-message-ttl`` and ``x-expires``).
  Other messages wait until consumed; only Celery's control replies and events get
  the short ``message_ttl``.
* Asynchronous: Yes (the LISTEN socket is registered with the worker's event loop)
* ETA/countdown: held in the database (``run_at``), never in worker memory; an idle
  worker wakes for the soonest ``run_at`` of its queues (database clock)
* Expires: a task still queued at its ``expires`` is never delivered and ends
  cancelled (Celery's REVOKED, "expired")

Connection string
=================
.. code-block::

    pgqueue://USER:PASSWORD@HOST:PORT/DBNAME?LIBPQ_PARAMETER=VALUE

The query string takes libpq parameters (``sslmode``, ``application_name``...).

Transport options
=================
Every field of :class:`celery_pgqueue.options.PgQueueOptions` (see the README's
configuration table); unknown keys are refused.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from multiprocessing.util import Finalize
from queue import Empty
from time import monotonic
from typing import Any

import psycopg
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments

from celery_pgqueue import batching, clock, finalize, maintenance, transaction
from celery_pgqueue.batching import PublishBatch
from celery_pgqueue.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidPayload,
)
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.leases import LeaseKeeper, process_owner
from celery_pgqueue.options import (
    DatabaseURL,
    PgQueueOptions,
    completed_retention,
    mask_password,
)
from celery_pgqueue.payload import from_payload, to_payload
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import ClaimedJob, NewJob, Store
from celery_pgqueue.store.listener import Listener, wake_note

# Imported for their signal handlers (settling rows the result backend won't; running
# delivered tasks now, whatever the worker's clock says).
__all__ = ["Channel", "QoS", "Transport", "clock", "finalize"]

logger = logging.getLogger("celery_pgqueue")

# Most rows one claim takes when the consumer sets no prefetch limit.
MAX_BATCH = 100
# Seconds an early ack may wait to ride on the next claim before it is written alone.
ACK_DELAY = 0.1
# Seconds a consumer with work in hand waits for half its prefetch to come free before
# it claims what room it has: batches for short tasks, no idle process next to long ones.
BATCH_WAIT = 0.05
# Seconds an auto-delete/exclusive queue outlives its last consumer.
AUTO_DELETE_AFTER = 60.0
# How long a process trusts its copy of an exchange's bindings.
BINDINGS_TTL = 1.0
# Seconds added to the time the claims took when the look-up that follows them asks
# for jobs that came due meanwhile (a look-up sent later than measured). Small: a job
# in that window that we cannot claim (paused queue, no room) wakes us again at once.
LOOKUP_SLACK = 0.005
# Mailbox exchanges (``<app>.pidbox``) carry ``revoke``; we cancel the rows too.
PIDBOX_SUFFIX = ".pidbox"
# Celery's events exchange (``event_exchange``) and the prefix of its receivers' queues.
EVENT_EXCHANGE = "celeryev"


def _tag(job_id: uuid.UUID, attempt: int) -> str:
    return f"{job_id}:{attempt}"


def _properties(message: Any) -> dict[str, Any]:
    props = message.properties if hasattr(message, "properties") else message["properties"]
    return props if isinstance(props, dict) else {}


def is_task_delivery(message: Any) -> bool:
    """Whether a delivered message is a Celery task (kept as history when acked)."""
    flag = _properties(message).get("pgqueue_task")
    if flag is not None:
        return bool(flag)
    headers = message.headers if hasattr(message, "headers") else message.get("headers")
    return is_task(headers)


def held_of(message: Any) -> tuple[uuid.UUID, int]:
    """``(job id, attempt)`` of a delivered message: the fence for every later write."""
    props = _properties(message)
    return uuid.UUID(props["pgqueue_job"]), int(props["pgqueue_attempt"])


def is_task(headers: Any) -> bool:
    """A Celery task message of protocol 2: name and id in the headers."""
    return isinstance(headers, dict) and "task" in headers and "id" in headers


def task_fields(headers: Any, body: Any) -> dict[str, Any] | None:
    """The fields naming a Celery task (``task``, ``id``, ``eta``, ``retries``), if it is one.

    Protocol 2 carries them in the headers; protocol 1 (``task_protocol=1``) in the
    body, readable when it is JSON. Tasks keep their row as history under their id;
    other messages are deleted once consumed.
    """
    if is_task(headers):
        return dict(headers)
    if is_task(body) and not (isinstance(headers, dict) and "task" in headers):
        return dict(body)
    return None


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


def _stored_body(payload: Any) -> Any:
    """The body of a stored payload when it is JSON kept readable, else None."""
    if isinstance(payload, dict) and payload.get("body_encoding") == "json":
        return payload.get("body")
    return None


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
        self.channel.transport.room_freed()

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        message = self._take(delivery_tag)
        if message is not None:
            if requeue:
                self.channel._requeue([message])
            else:
                self.channel._settle_reject(message)
        self._quick_ack(delivery_tag)
        self.channel.transport.room_freed()

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


class Channel(virtual.Channel):  # type: ignore[misc]
    """Kombu channel whose queues are ``job_queues`` rows and messages ``jobs`` rows."""

    QoS = QoS
    supports_fanout = True
    from_transport_options: tuple[str, ...] = ()

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.transport = connection
        self.store: Store = connection.store
        self._no_ack_queues: set[str] = set()

    # -- publishing ------------------------------------------------------------------

    def prepare_message(
        self,
        body: Any,
        priority: int | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """As Kombu's, but an absent priority stays absent and 0 stays 0.

        Kombu's version stores ``priority or default``, losing an explicit 0; and we
        want "none given" to mean the queue's ``default_priority``.
        """
        properties = properties or {}
        properties.setdefault("delivery_info", {})
        properties.setdefault("priority", priority)
        return {
            "body": body,
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers or {},
            "properties": properties,
        }

    def basic_publish(
        self,
        message: dict[str, Any],
        exchange: str,
        routing_key: str,
        _publish_batch: PublishBatch | None = None,
        **kwargs: Any,
    ) -> None:
        """Route and insert in one statement, whatever the number of queues.

        Inside a publish batch the rows are only built here (size and priority errors
        raise at once) and inserted when the batch flushes.
        """
        jobs = self.route(message, exchange, routing_key)
        if _publish_batch is not None:
            _publish_batch.add(jobs)
        elif jobs:
            self.enqueue(jobs)

    def route(self, message: dict[str, Any], exchange: str, routing_key: str) -> list[NewJob]:
        """The rows ``message`` becomes: one per queue it is routed to (none if unroutable)."""
        if exchange and exchange.endswith(PIDBOX_SUFFIX):
            self._cancel_revoked(message)
        self._inplace_augment_message(message, exchange, routing_key)
        if not exchange:
            queues = [routing_key]
        elif self.typeof(exchange).type == "fanout":
            queues = sorted({q for _, _, q in self.get_table(exchange)})
        else:
            queues = list(dict.fromkeys(self._lookup(exchange, routing_key)))
        return [self._new_job(queue, message, shared=len(queues) > 1) for queue in queues]

    def enqueue(self, jobs: list[NewJob]) -> None:
        """Insert rows in one statement, in the caller's transaction inside ``enqueue_in``."""
        self.store.enqueue(jobs, conn=transaction.connection_for(self.store))

    def create_publish_batch(self, max_size: int) -> PublishBatch:
        """Kombu's ``Producer.batch()``: many publishes, one INSERT per ``max_size`` rows."""
        return PublishBatch(self, max_size)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self.enqueue([self._new_job(queue, message)])

    def _put_fanout(
        self, exchange: str, message: dict[str, Any], routing_key: str, **kw: Any
    ) -> None:
        queues = sorted({q for _, _, q in self.get_table(exchange)})
        if queues:
            self.enqueue([self._new_job(q, message, shared=True) for q in queues])

    def _new_job(self, queue: str, message: dict[str, Any], *, shared: bool = False) -> NewJob:
        """The row for ``message`` in ``queue``: size-checked, readable JSON payload."""
        options = self.transport.options
        headers = message.get("headers") or {}
        properties = message.get("properties") or {}
        document, _ = to_payload(
            message, limit=options.max_payload_bytes, canvas_limit=options.max_canvas_bytes
        )
        task = task_fields(headers, _stored_body(document))
        if task:
            job_id = job_id_for(task["id"])
            if shared:  # one task sent to several queues: one row each
                job_id = uuid.uuid5(job_id, queue)
        else:
            job_id = uuid.uuid4()
        ttl: float | None = None
        expiration = properties.get("expiration")
        if expiration not in (None, ""):
            try:
                ttl = max(0.0, float(expiration) / 1000.0)
            except (TypeError, ValueError):
                ttl = None
        delay: float | None = None
        exchange = (properties.get("delivery_info") or {}).get("exchange") or ""
        if task:
            # Celery sends absolute times from this process's clock: back to intervals
            # on the same clock, which the database adds to its own now().
            delay = clock.seconds_until(task.get("eta"))
            if ttl is None and (left := clock.seconds_until(task.get("expires"))) is not None:
                ttl = max(0.0, left)
        elif is_celery_transient(queue, exchange):
            ttl = min(ttl, options.message_ttl) if ttl is not None else options.message_ttl
        priority = properties.get("priority")
        if priority is not None:
            try:
                priority = int(priority)
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"message priority must be an integer, got {priority!r}"
                ) from None
        return NewJob(
            id=job_id,
            queue_name=queue,
            payload=document,
            priority=priority,
            delay_seconds=delay,
            ttl_seconds=ttl,
        )

    def _cancel_revoked(self, message: dict[str, Any]) -> None:
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
            self.store.cancel([job_id_for(t) for t in task_ids], revoked=True)

    # -- consuming -------------------------------------------------------------------

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        while True:
            claimed = self.store.claim(queue, 1, self.transport.owner)
            if not claimed:
                raise Empty()
            try:
                return self.transport.to_message(claimed[0])
            except InvalidPayload as exc:
                self._fail_undeliverable(claimed[0], exc)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        # A get is a consumer too (``SimpleQueue.get_nowait``): its queue stays alive
        # and what it takes keeps its lease until acked.
        self.transport.start_background()
        self.transport.used_queue(queue)
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self.transport.defer_ack(held_of(message), transient=not is_task_delivery(message))
        return message

    def claim_into(self, queue: str, limit: int) -> int:
        """Claim up to ``limit`` rows of ``queue`` and hand each to its consumer.

        Deferred acks are written by the same statement.
        """
        acked = self.transport.take_acks()
        try:
            claimed = self.store.claim(queue, limit, self.transport.owner, acked)
        except Exception:
            self.transport.return_acks(acked)
            raise
        settle_now = queue in self._no_ack_queues
        for job in claimed:
            try:
                message = self.transport.to_message(job)
            except InvalidPayload as exc:
                self._fail_undeliverable(job, exc)
                continue
            if settle_now:
                # A no_ack consumer (remote-control mailboxes) never acks: the
                # delivery itself settles the row.
                self.transport.defer_ack(
                    (job.id, job.attempt), transient=not is_task_delivery(message)
                )
            try:
                self.connection._deliver(message, queue)
            except self.transport.connection_errors:
                raise
            except Exception as exc:
                # Celery could not take it (a header it cannot parse, say). Raised
                # out of here it would stop the event loop, and the row, rescued and
                # claimed again, would stop the next worker too: settle it instead.
                self.qos._delivered.pop(message["properties"]["delivery_tag"], None)
                self._fail_undeliverable(job, exc)
        return len(claimed)

    def _fail_undeliverable(self, job: ClaimedJob, exc: Exception) -> None:
        """Mark a row no worker can take ``failed``, say so in the log, and carry on.

        The log names the job (never its payload); the row keeps the reason, so
        ``pgqueue jobs --status failed`` finds it, and ``pgqueue retry`` brings it
        back once the payload is fixed.
        """
        reason = str(exc) if isinstance(exc, InvalidPayload) else f"{type(exc).__name__}: {exc}"
        fix = f"fix jobs.payload, then `celery -A proj pgqueue retry {job.id}` (or delete the row)"
        logger.error(
            "pgqueue: job %s in queue %r cannot be delivered (%s); marked failed: %s",
            job.id,
            job.queue_name,
            reason,
            fix,
            exc_info=not isinstance(exc, InvalidPayload),
        )
        self.store.finish(
            job.id,
            attempt=job.attempt,
            status=JobStatus.FAILED,
            log_status=LogStatus.FAILED,
            error_message=f"InvalidPayload: {reason}",
            log_message=f"not delivered: {reason}; {fix}",
        )

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        consumer = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        # Leases and queue expiry are renewed from the first consume on, whether or
        # not an event loop ever registers this transport (Flower, `celery events`,
        # Kombu's ConsumerMixin and SimpleQueue call drain_events() themselves).
        self.transport.start_background()
        return consumer

    def _settle_ack(self, message: Any) -> None:
        self.transport.defer_ack(held_of(message), transient=not is_task_delivery(message))

    def _settle_reject(self, message: Any) -> None:
        held = held_of(message)
        if is_task_delivery(message):
            self.store.finish(
                held[0],
                attempt=held[1],
                status=JobStatus.FAILED,
                log_status=LogStatus.FAILED,
                error_message="Rejected: the worker rejected the message without requeue",
                log_message="rejected",
            )
        else:
            self.store.delete_held([held])

    def _requeue(self, messages: Iterable[Any]) -> None:
        self.store.requeue([held_of(m) for m in messages])

    def _restore(self, message: Any) -> None:
        self._requeue([message])

    def _restore_at_beginning(self, message: Any) -> None:
        self._requeue([message])

    # -- queues and bindings ---------------------------------------------------------

    def prepare_queue_arguments(self, arguments: Any, **kwargs: Any) -> Any:
        """``Queue(message_ttl=…)`` becomes ``x-message-ttl``, as on RabbitMQ and Redis.

        Kombu's default drops these keywords for virtual transports. Only the message
        TTL is taken: a queue's expiry stays as ``_new_queue`` decides it.
        """
        message_ttl = kwargs.get("message_ttl")
        if message_ttl is None:
            return arguments
        return to_rabbitmq_queue_arguments(arguments or {}, message_ttl=message_ttl)

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self.store.ensure_queues([queue])
        arguments = kwargs.get("arguments") or {}
        expires = arguments.get("x-expires")
        seconds = float(expires) / 1000.0 if expires else None
        if seconds is None and (kwargs.get("auto_delete") or kwargs.get("exclusive")):
            # AMQP drops these with their last consumer (a worker's Broadcast queue);
            # here they expire a while after nobody keeps them alive, with their
            # waiting messages and bindings, instead of collecting copies forever.
            seconds = AUTO_DELETE_AFTER
        if seconds:
            self.transport.queue_expiry[queue] = seconds
            self.store.touch_queues([(queue, seconds)])
        message_ttl = arguments.get("x-message-ttl")
        if message_ttl is not None:
            self.store.set_queue_message_ttl(queue, max(0.0, float(message_ttl) / 1000.0))

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self.store.queue_exists(queue)

    def _size(self, queue: str) -> int:
        return self.store.count_waiting(queue)

    def _purge(self, queue: str) -> int:
        return self.store.purge(queue)

    def _delete(
        self, queue: str, exchange: str, routing_key: str, pattern: str, *args: Any
    ) -> None:
        self.store.unbind(exchange, routing_key, queue)
        self.transport.forget_bindings(exchange)

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        if if_empty and self._size(queue):
            return
        super().queue_delete(queue, if_unused=if_unused, if_empty=if_empty, **kwargs)
        self.transport.queue_expiry.pop(queue, None)
        self.store.delete_queue(queue)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        exchange_type = self.typeof(exchange).type
        self.store.bind(exchange, exchange_type, routing_key or "", queue)
        self.transport.forget_bindings(exchange)

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        """Bindings from the database (cached briefly), so producers route like workers."""
        return self.transport.bindings(exchange, self)

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        try:
            kind = self.state.exchanges[exchange]["type"]
        except KeyError:
            kind = self.transport.exchange_type(exchange) or default
        return self.exchange_types[kind]


class Transport(virtual.Transport):  # type: ignore[misc]
    """The pgqueue transport: see the module docstring."""

    Channel = Channel

    can_parse_url = True
    default_port = 5432
    driver_type = "pgqueue"
    driver_name = "psycopg"
    polling_interval = 1.0

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
        batch_publish=True,
    )

    connection_errors = (
        *virtual.Transport.connection_errors,
        DatabaseUnavailable,
        psycopg.OperationalError,
        psycopg.InterfaceError,
        ConnectionError,
        OSError,
    )

    # Every instance: a forked child gets new locks and no parent's pending writes.
    _instances: weakref.WeakSet[Transport] = weakref.WeakSet()

    def __init__(self, client: Any, **kwargs: Any) -> None:
        self.options = PgQueueOptions.parse(client.transport_options)
        raw = client.hostname or ""
        if "://" in raw:
            self.url = DatabaseURL.parse(raw)
            # With can_parse_url Kombu leaves the port unset; report the real one.
            client.port = client.port or self.url.port or self.default_port
        else:
            # Kombu's failover (Connection.switch) hands alternates over parsed.
            self.url = DatabaseURL(
                host=raw or None,
                port=client.port,
                user=client.userid,
                password=client.password,
                database=(client.virtual_host or "").strip("/") or None,
            )
        super().__init__(client, **kwargs)
        self.polling_interval = self.options.polling_interval
        # Set when Kombu collects this connection after an error (Celery's consumer
        # restart): its channels then keep what the pool still runs.
        self.connection_lost = False
        self._closed = False
        self._created_pid = os.getpid()
        self.queue_expiry: dict[str, float] = {}
        self._queue_gets: dict[str, float] = {}
        self._bindings: dict[str, tuple[float, list[tuple[str, str, str]]]] = {}
        self._binding_types: dict[str, str | None] = {}
        self._listener: Listener | None = None
        self._wanted = True
        self._drained: set[str] = set()
        self._rotation = itertools.count()
        self._loop: Any = None
        self._nudge: tuple[socket.socket, socket.socket] | None = None
        self._nudge_pending = False
        self._poll_timer: Any = None
        self._batch_wait_since: float | None = None
        # When the soonest scheduled job of our queues comes due (monotonic), its
        # event-loop timer, and whether to ask the database again.
        self._next_due: float | None = None
        self._due_timer: Any = None
        self._schedule_stale = True
        self._background: threading.Thread | None = None
        self._keeper: LeaseKeeper | None = None
        self._stopping = threading.Event()
        self._pid = os.getpid()
        self._ack_lock = threading.Lock()
        self._pending_acks: list[tuple[uuid.UUID, int]] = []
        self._acks_since = 0.0
        self._pending_deletes: list[tuple[uuid.UUID, int]] = []
        Transport._instances.add(self)

    @classmethod
    def _after_fork_in_child(cls) -> None:
        """A connection inherited by a forked child (a prefork pool process) is never
        the child's to use, but if it is touched nothing may hang: the parent's
        threads (maintenance, a consumer) may have held its lock at the fork. Its
        pending acks are the parent's to write, and its threads did not survive."""
        for transport in list(cls._instances):
            transport._ack_lock = threading.Lock()
            transport._pending_acks = []
            transport._pending_deletes = []
            transport._stopping = threading.Event()
            transport._background = None
            transport._keeper = None

    # -- connection ------------------------------------------------------------------

    @property
    def store(self) -> Store:
        return Store.for_url(self.url, self.options)

    @property
    def owner(self) -> str:
        """The lease owner of this process's claims: one name for every connection, so
        a reconnected consumer's keeper still renews the tasks its pool is running."""
        return process_owner()

    @property
    def listener(self) -> Listener:
        if self._listener is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._listener = Listener(
                self.url, [self.store.channel], connect_timeout=self.options.connect_timeout
            )
        return self._listener

    def establish_connection(self) -> Transport:
        """Fail fast: an unreachable server retries, missing tables stop with the fix.

        Always one round trip, even once the schema is known good: Kombu's reconnect
        loops (a producer's publish retry, the consumer's reconnect) wait between
        attempts only while this raises. Succeeding without asking the server made a
        publish retry use up its attempts within milliseconds of a restart.
        """
        self.store.check_schema(round_trip=True)
        result: Transport = super().establish_connection()
        self._closed = self.connection_lost = False  # Kombu may reopen a closed transport
        return result

    def _collect(self, connection: Any) -> None:
        """Kombu's ``Connection.collect``: the connection is gone, the process lives on.

        Celery calls it when its consumer restarts after a connection error, and Kombu
        after a fork. Unlike a close, nothing the worker is still running is given back
        (see ``QoS.restore_unacked``). A forked child leaves everything to its parent.
        """
        if os.getpid() != self._created_pid:
            return
        self.connection_lost = True
        self.close_connection(connection)

    def close_connection(self, connection: Any) -> None:
        self._closed = True
        self._stopping.set()
        if self._keeper is not None:
            self._keeper.detach(self)
        try:
            self.flush_acks(force=True)
        except Exception as exc:
            # The rows stay as they are: an unwritten early ack reads as unacked
            # (requeued, not failed, when its lease runs out), an unconsumed
            # transient message expires with its TTL.
            logger.warning(
                "pgqueue could not write %d acks at close (%s); job ids: %s",
                len(self._pending_acks) + len(self._pending_deletes),
                exc,
                ", ".join(str(j) for j, _ in self._pending_acks + self._pending_deletes),
            )
        super().close_connection(connection)
        if self._listener is not None:
            self._listener.close()

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The URL for ``celery report`` and logs: password masked unless asked."""
        try:
            parsed = DatabaseURL.parse(uri)
        except ConfigurationError:
            return mask_password(uri)
        if include_password:
            return uri
        return parsed.masked()

    def driver_version(self) -> str:
        return str(psycopg.__version__)

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"port": self.default_port, "hostname": "localhost"}

    # -- delivery --------------------------------------------------------------------

    def to_message(self, job: ClaimedJob) -> dict[str, Any]:
        """The Kombu message for a claimed row, stamped for this delivery."""
        payload = job.payload
        stored_headers = payload.get("headers") if isinstance(payload, dict) else None
        task = task_fields(stored_headers, _stored_body(payload))
        message = from_payload(payload, json_body=task is not None)
        headers = message["headers"]
        # The eta stays as sent (the task reads it); the database held the job until
        # run_at, and clock.py has the worker run it at once instead of waiting again.
        if job.expires_in is not None and headers.get("expires") and is_task(headers):
            # Celery's worker drops an expired task by its own clock: give it the
            # database's verdict, as a moment on that clock.
            local = datetime.now(UTC) + timedelta(seconds=job.expires_in)
            headers["expires"] = local.isoformat()
        properties = message["properties"]
        retries = (task.get("retries") or 0) if task else 0
        if not isinstance(retries, int) or isinstance(retries, bool):
            raise InvalidPayload("payload header 'retries' is not an integer")
        if properties.get("priority") is None:
            # Shown as Redis and RabbitMQ show it (Kombu stamps 0 when none is given),
            # though the row got its queue's default_priority. The mark lets a retry,
            # which re-sends this 0, keep the queue's default (finalize.py).
            properties.update(priority=0, pgqueue_default_priority=True)
        properties.update(
            delivery_tag=_tag(job.id, job.attempt),
            delivery_info={
                "exchange": payload.get("exchange", ""),
                "routing_key": payload.get("routing_key") or job.queue_name,
                "priority": properties.get("priority"),
                "redelivered": job.attempt > int(retries) + 1,
            },
            pgqueue_job=str(job.id),
            pgqueue_attempt=job.attempt,
            pgqueue_task=task is not None,
        )
        return message

    def defer_ack(self, held: tuple[uuid.UUID, int], *, transient: bool) -> None:
        """Queue an ack: it rides on the next claim, or is written within ``ACK_DELAY``.

        Most early acks of short tasks are written by the next claim statement, or
        would find the row already finished; a statement of their own per tick was
        mostly no-op updates. Until written the row still reads as unacked, so a
        worker that dies in that window (at most ``ACK_DELAY``, or one poll interval
        when idle) has the task requeued rather than marked lost.
        """
        if self._closed:
            # A delivery kept across a consumer restart, acked after this connection
            # closed: nothing will flush for it, so write it now.
            try:
                (self.store.delete_held if transient else self.store.mark_acked)([held])
            except Exception as exc:
                logger.warning("pgqueue could not record the ack of job %s: %s", held[0], exc)
            return
        with self._ack_lock:
            if transient:
                self._pending_deletes.append(held)
                return
            if not self._pending_acks:
                self._acks_since = monotonic()
            self._pending_acks.append(held)

    def take_acks(self) -> list[tuple[uuid.UUID, int]]:
        """Hand the deferred task acks to a statement that will write them."""
        if not self._pending_acks:
            return []
        with self._ack_lock:
            acks, self._pending_acks = self._pending_acks, []
        return acks

    def return_acks(self, acks: list[tuple[uuid.UUID, int]]) -> None:
        """Put acks back after the statement that was to write them failed."""
        if acks:
            with self._ack_lock:
                self._pending_acks[:0] = acks

    def flush_acks(self, force: bool = False) -> None:
        """Write deferred acks: ``acked_at`` for tasks, delete other consumed messages.

        Task acks younger than ``ACK_DELAY`` wait (for a claim to carry them) unless
        ``force``.
        """
        if not (self._pending_acks or self._pending_deletes):
            return
        if not force and not self._pending_deletes and monotonic() - self._acks_since < ACK_DELAY:
            return
        acks = self.take_acks()
        with self._ack_lock:
            deletes, self._pending_deletes = self._pending_deletes, []
        try:
            self.store.mark_acked(acks)
            self.store.delete_held(deletes)
        except Exception:
            self.return_acks(acks)
            with self._ack_lock:
                self._pending_deletes[:0] = deletes
            raise

    def deliver_ready(self) -> int:
        """Claim and deliver what our consumers have room for; returns how many.

        Sets ``_wanted`` when more may be waiting (a full batch, or no room yet), so the
        event loop's tick comes back without waiting for a NOTIFY or the poll timer.
        """
        claims_began = monotonic()
        delivered = 0
        wanted = False
        for channel in list(self.channels):
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
                got = channel.claim_into(queue, limit)
                delivered += got
                if got >= limit:
                    wanted = True
                else:
                    self._drained.add(queue)
        self.flush_acks()
        self._wanted = wanted
        if self._schedule_stale:
            # After the claims, and with the event loop after what they delivered has
            # gone to the pool (a countdown task starts a round trip sooner); so the
            # look-up also counts jobs that came due since the claims began: each is
            # either claimed or in the answer, never missed by both.
            if delivered and self._loop is not None:
                self._schedule_stale = False
                self._loop.call_soon(self._plan_wake, claims_began)
            else:
                self._plan_wake(claims_began)
        return delivered

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

    # -- waking for scheduled jobs ---------------------------------------------------
    # A job with a countdown becomes due without any NOTIFY. The worker asks the
    # database how long until the soonest scheduled job of its queues (an interval on
    # the database's clock, waited out on our monotonic one) and sets a timer for it;
    # a publish of a sooner one says so in its NOTIFY and moves the timer earlier. The
    # poll every polling_interval stays the fallback.

    def _consumed_queues(self) -> set[str]:
        return {
            queue
            for channel in list(self.channels)
            if channel._consumers and not channel.closed
            for queue in channel._active_queues
        }

    def _plan_wake(self, claims_began: float) -> None:
        """Ask the database when the soonest scheduled job of our queues comes due,
        counting jobs that came due since ``claims_began`` (monotonic)."""
        self._schedule_stale = False
        queues = self._consumed_queues()
        within = monotonic() - claims_began + LOOKUP_SLACK
        seconds = self.store.next_due(sorted(queues), within) if queues else None
        self._set_due(seconds, replace=True)

    def _set_due(self, seconds: float | None, *, replace: bool) -> None:
        """Wake ``seconds`` from now; ``replace``: the database's answer, else a hint
        that only ever moves the wake-up earlier."""
        if seconds is None:
            if replace:
                self._cancel_due()
            return
        # No margin needed: both sources are late, never early (a NOTIFY arrives after
        # its commit; the look-up's answer after the database's now()).
        seconds = max(0.0, seconds)
        deadline = monotonic() + seconds
        if not replace and self._next_due is not None and self._next_due <= deadline:
            return
        self._cancel_due()
        self._next_due = deadline
        if self._loop is not None:
            self._due_timer = self._loop.call_later(seconds, self._on_due)

    def _cancel_due(self) -> None:
        self._next_due = None
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None

    def _on_due(self) -> None:
        self._due_timer = None
        self._came_due()
        if self.deliver_ready():
            self._wake_loop()  # start it now, not after the hub's next poll timeout

    def _came_due(self) -> None:
        """The soonest scheduled job is due: claim again, then ask for the next one."""
        self._next_due = None
        self._drained.clear()
        self._wanted = True
        self._schedule_stale = True

    def _take_notes(self, notes: Iterable[tuple[str, str]]) -> bool:
        """Apply NOTIFY payloads; True when one says jobs are due now."""
        due = False
        consumed: set[str] | None = None
        for _, payload in notes:
            # Always read as a queue name too: a name may contain the mark itself.
            self._drained.discard(payload)
            queue, seconds = wake_note(payload)
            if seconds is None:
                due = True
                continue
            consumed = self._consumed_queues() if consumed is None else consumed
            if queue in consumed:
                self._set_due(seconds, replace=False)
        return due

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Synchronous consumers: deliver, else sleep on the LISTEN socket."""
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            if self.deliver_ready():
                return
            remaining = self.polling_interval
            if self._batch_wait_since is not None:
                remaining = min(remaining, BATCH_WAIT)
            if self._next_due is not None:
                remaining = min(remaining, max(0.0, self._next_due - monotonic()))
            if deadline is not None:
                left = deadline - monotonic()
                if left <= 0:
                    raise TimeoutError()
                remaining = min(remaining, left)
            self._sleep(remaining)
            if self._next_due is not None and monotonic() >= self._next_due:
                self._came_due()

    def _sleep(self, seconds: float) -> None:
        if not self.options.use_notify:
            self._stopping.wait(seconds)
            self._drained.clear()
            self._schedule_stale = True
            return
        try:
            notes = self.listener.wait(seconds)
        except DatabaseUnavailable:
            self._listen_dropped()
            raise
        if notes:
            self._take_notes(notes)
        else:
            self._drained.clear()

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Sleep on the LISTEN socket; tick and a poll timer cover the rest."""
        self._loop = loop
        if self.options.use_notify:
            loop.add_reader(self.listener.fileno(), self._on_readable)
        if self._nudge is None:
            self._nudge = socket.socketpair()
            for end in self._nudge:
                end.setblocking(False)
        loop.add_reader(self._nudge[0].fileno(), self._on_nudged)
        loop.on_tick.add(self._on_tick)
        self._poll_timer = loop.call_repeatedly(self.polling_interval, self._on_poll_timer)
        self._wanted = True
        self._cancel_due()
        self._schedule_stale = True  # learn the soonest scheduled job on the first tick
        self.start_background()

    def unregister_from_event_loop(self, connection: Any, loop: Any) -> None:
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
        self._cancel_due()

    def _listen_dropped(self) -> None:
        """Whatever ended the LISTEN session (a restart, a failover, an administrator)
        most likely ended the pool's idle sessions too: drop them now, so the consumer's
        reconnect starts on fresh sessions instead of failing, and restarting, once more
        on a stale one."""
        with contextlib.suppress(Exception):
            self.store.dispose()

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
            self.flush_acks()
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
        self._drained.clear()  # the fallback: a NOTIFY may have been missed
        if not self.options.use_notify:
            self._schedule_stale = True  # no publish tells us of sooner jobs
        self.deliver_ready()

    # -- bindings cache --------------------------------------------------------------

    def bindings(self, exchange: str, channel: Any) -> list[tuple[str, str, str]]:
        """``(routing_key, pattern, queue)`` rows as Kombu's exchange types expect."""
        now = monotonic()
        cached = self._bindings.get(exchange)
        if cached and cached[0] > now:
            return cached[1]
        rows = self.store.binding_table(exchange)
        table = []
        for exchange_type, routing_key, queue in rows:
            kind = channel.exchange_types.get(exchange_type)
            if kind is None:
                continue
            table.append(kind.prepare_bind(queue, exchange, routing_key, None))
        self._bindings[exchange] = (now + BINDINGS_TTL, table)
        self._binding_types[exchange] = rows[0][0] if rows else None
        return table

    def exchange_type(self, exchange: str) -> str | None:
        if exchange not in self._binding_types:
            rows = self.store.binding_table(exchange)
            self._binding_types[exchange] = rows[0][0] if rows else None
        return self._binding_types[exchange]

    def forget_bindings(self, exchange: str) -> None:
        self._bindings.pop(exchange, None)

    # -- leases, maintenance -----------------------------------------------------------

    def held_jobs(self) -> list[uuid.UUID]:
        """Deliveries of this connection not yet acked (the lease keeper reads them).
        Celery's running and reserved tasks are added by the keeper itself, for the
        whole process (see ``leases.py``); may raise, and the keeper then says so.
        """
        held = {job_id for channel in list(self.channels) for job_id, _ in channel.qos.held()}
        held.update(job_id for job_id, _ in detached_held())  # kept across a consumer restart
        return sorted(held)

    def used_queue(self, queue: str) -> None:
        """A ``basic_get`` on ``queue``: it counts as used for one expiry period."""
        if queue in self.queue_expiry:
            self._queue_gets[queue] = monotonic()

    def expiring_queues(self) -> list[tuple[str, float]]:
        """Queues with an ``x-expires`` this connection keeps alive, as AMQP does:
        while a consumer consumes them, and for one expiry period after a get."""
        consumed = {q for channel in list(self.channels) for q in list(channel._active_queues)}
        now = monotonic()
        return [
            (queue, seconds)
            for queue, seconds in list(self.queue_expiry.items())
            if queue in consumed or now - self._queue_gets.get(queue, -seconds) < seconds
        ]

    def start_background(self) -> None:
        """Attach to the process's lease keeper; start maintenance (both idempotent).

        Called by the first consume, in event-loop and synchronous consumers alike.
        Lease renewal has a thread and a connection of its own (``leases.py``); this
        connection's thread writes deferred acks and runs maintenance on the pool, so
        neither a long maintenance pass nor an exhausted pool can delay a renewal.
        """
        if self._keeper is None or self._keeper.store is not self.store:
            self._keeper = LeaseKeeper.for_store(self.store)
        self._keeper.attach(self)
        if self._background is not None and self._background.is_alive():
            return
        self._stopping.clear()
        self._background = threading.Thread(
            target=self._background_loop, name="pgqueue-maintenance", daemon=True
        )
        self._background.start()

    def _background_loop(self) -> None:
        interval = self.options.maintenance_interval
        beat = min(max(0.2, self.options.lease_seconds / 3), interval)
        last_maintenance = 0.0
        while not self._stopping.wait(beat):
            try:
                self.flush_acks()
            except Exception as exc:  # the consumer sees connection errors itself
                logger.warning("pgqueue could not write deferred acks (retried next beat): %s", exc)
            if monotonic() - last_maintenance >= interval:
                last_maintenance = monotonic()
                try:
                    run_maintenance(self.store, keeper=self._keeper)
                except Exception as exc:
                    logger.warning("pgqueue maintenance failed (retried next pass): %s", exc)


def run_maintenance(store: Store, *, keeper: LeaseKeeper | None = None) -> None:
    """Orphan rescue and retention, one process at a time (see maintenance.py).

    With this process's ``keeper``, its leases are renewed first if due and the jobs
    it holds are spared: after a stall (a C call holding the GIL) every thread wakes
    at once, and its own rescue must not take back the jobs it is still running only
    because their renewal has not run yet.
    """
    retention = completed_retention(store.options, _result_expires())
    spare = keeper.before_rescue if keeper is not None else None
    maintenance.run_once(store, completed_retention=retention, spare=spare)


def _result_expires() -> Any:
    """The worker's ``result_expires`` (Celery's current app: the worker's own)."""
    from celery import current_app

    return current_app.conf.result_expires


os.register_at_fork(after_in_child=Transport._after_fork_in_child)

# Without the interpreter-start hook (an editable install, say) groups are batched from
# the moment the transport is first loaded.
batching.install_group_batching()
