"""The channel Kombu sees: queues are ``job_queues`` rows, messages are ``jobs`` rows.

Publishing routes a message through the stored bindings (:mod:`.routing`) and inserts
its rows in one statement; consuming claims rows for the poller (:mod:`.poller`) and
hands them to Kombu; acks go through the connection's buffer (:mod:`.acks`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from queue import Empty
from typing import TYPE_CHECKING, Any

from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments

from celery_pgqueue import transaction, unique
from celery_pgqueue.errors import ConfigurationError, InvalidPayload
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import ClaimedJob, NewJob, Store
from celery_pgqueue.transport import routing
from celery_pgqueue.transport.messages import held_of, is_task_delivery, new_job, to_message
from celery_pgqueue.transport.publish import PublishBatch
from celery_pgqueue.transport.qos import QoS

if TYPE_CHECKING:
    from celery_pgqueue.transport.transport import Transport

logger = logging.getLogger("celery_pgqueue")

# Seconds an auto-delete/exclusive queue outlives its last consumer.
AUTO_DELETE_AFTER = 60.0


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
        #: The batch every publish goes into, for Kombu without ``Producer.batch()``.
        self.open_batch: PublishBatch | None = None

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
        raise at once) and inserted when the batch flushes. A unique task is written
        at once, even in a batch: its caller learns here which job holds its key.
        """
        jobs = self.route(message, exchange, routing_key)
        if _publish_batch is None:
            _publish_batch = self.open_batch
        if jobs and jobs[0].unique_key is not None:
            self.enqueue_unique(jobs)
        elif _publish_batch is not None:
            _publish_batch.add(jobs)
        elif jobs:
            self.enqueue(jobs)

    def route(self, message: dict[str, Any], exchange: str, routing_key: str) -> list[NewJob]:
        """The rows ``message`` becomes: one per queue it is routed to (none if unroutable)."""
        if routing.is_mailbox(exchange):
            routing.cancel_revoked(self.store, message)
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

    def enqueue_unique(self, jobs: list[NewJob]) -> None:
        """Write a unique task unless a live job holds its key; report that job if so."""
        if len(jobs) > 1:
            raise ConfigurationError(
                f"unique_key: the task is routed to {len(jobs)} queues; a unique task "
                "goes to one queue (one job per key)"
            )
        conn = transaction.connection_for(self.store)
        live = self.store.enqueue_unique(jobs[0], conn=conn)
        if live.task_id is not None:
            unique.report_holder(live.task_id)

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
        return new_job(queue, message, self.transport.options, shared=shared)

    # -- consuming -------------------------------------------------------------------

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        while True:
            claimed = self.store.claim(queue, 1, self.transport.owner)
            if not claimed:
                raise Empty()
            try:
                return to_message(claimed[0])
            except InvalidPayload as exc:
                self._fail_undeliverable(claimed[0], exc)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        # A get is a consumer too (``SimpleQueue.get_nowait``): its queue stays alive
        # and what it takes keeps its lease until acked.
        self.transport.start_background()
        self.transport.used_queue(queue)
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self.transport.acks.defer(held_of(message), transient=not is_task_delivery(message))
        return message

    def claim_into(self, queue: str, limit: int, drained: str | None = None) -> int:
        """Claim up to ``limit`` rows of ``queue`` and hand each to its consumer.

        Deferred acks are written by the same statement; so is the ``drained`` note
        (NOTIFYed if the claim takes fewer than ``limit``, see ``herd.py``).
        """
        acked = self.transport.acks.take()
        try:
            claimed = self.store.claim(queue, limit, self.transport.owner, acked, drained)
        except Exception:
            self.transport.acks.give_back(acked)
            raise
        settle_now = queue in self._no_ack_queues
        for job in claimed:
            try:
                message = to_message(job)
            except InvalidPayload as exc:
                self._fail_undeliverable(job, exc)
                continue
            if settle_now:
                # A no_ack consumer (remote-control mailboxes) never acks: the
                # delivery itself settles the row.
                self.transport.acks.defer(
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
        self.transport.acks.defer(held_of(message), transient=not is_task_delivery(message))

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
        self.transport.routes.forget(exchange)

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
        self.transport.routes.forget(exchange)

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        """Bindings from the database (cached briefly), so producers route like workers."""
        return self.transport.routes.table(exchange, self)

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        try:
            kind = self.state.exchanges[exchange]["type"]
        except KeyError:
            kind = self.transport.routes.exchange_type(exchange) or default
        return self.exchange_types[kind]
