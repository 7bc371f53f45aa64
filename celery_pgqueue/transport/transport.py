"""The Transport Kombu sees: one per connection, holding what its channels share.

Its parts each live in a module of their own: the poller (:mod:`.poller`: LISTEN,
wake-up socket, poll timer, delivery), the ack buffer (:mod:`.acks`), the bindings
cache (:mod:`.routing`) and the maintenance runner (:mod:`.maintainer`, which also
attaches the process's lease keeper, :mod:`.leases`). What stays here is the
connection's life (open, close, a consumer restart, a fork) and what the lease keeper
asks of it (:class:`~celery_pgqueue.transport.leases.LeaseSource`).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref
from time import monotonic
from typing import Any

import psycopg
from kombu.transport import virtual

from celery_pgqueue import completions  # noqa: F401  (starts with a prefork pool)
from celery_pgqueue.errors import DatabaseUnavailable
from celery_pgqueue.store import Store
from celery_pgqueue.transport import url as urls
from celery_pgqueue.transport.acks import AckBuffer
from celery_pgqueue.transport.channel import Channel
from celery_pgqueue.transport.leases import process_owner
from celery_pgqueue.transport.maintainer import Maintainer
from celery_pgqueue.transport.poller import Poller
from celery_pgqueue.transport.qos import detached_held
from celery_pgqueue.transport.routing import Bindings

logger = logging.getLogger("celery_pgqueue")


class Transport(virtual.Transport):  # type: ignore[misc]
    """The pgqueue transport: see :mod:`celery_pgqueue.transport`."""

    Channel = Channel

    can_parse_url = True
    default_port = urls.DEFAULT_PORT
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
        self.options = urls.client_options(client)
        self.url = urls.client_url(client)
        super().__init__(client, **kwargs)
        self.polling_interval = self.options.polling_interval
        # Set when Kombu collects this connection after an error (Celery's consumer
        # restart): its channels then keep what the pool still runs.
        self.connection_lost = False
        self._created_pid = os.getpid()
        self.queue_expiry: dict[str, float] = {}
        self._queue_gets: dict[str, float] = {}
        self.routes = Bindings(lambda: self.store)
        self.acks = AckBuffer(lambda: self.store)
        self.poller = Poller(self)
        self.maintainer = Maintainer(self)
        # Set at close: stops the maintenance thread and a synchronous poll's sleep.
        self.stopping = threading.Event()
        Transport._instances.add(self)

    @classmethod
    def _after_fork_in_child(cls) -> None:
        """A connection inherited by a forked child (a prefork pool process) is never
        the child's to use, but if it is touched nothing may hang: the parent's
        threads (maintenance, a consumer) may have held its lock at the fork. Its
        pending acks are the parent's to write, and its threads did not survive."""
        for transport in list(cls._instances):
            transport.acks.after_fork_in_child()
            transport.stopping = threading.Event()
            transport.maintainer.after_fork_in_child()

    # -- connection ------------------------------------------------------------------

    @property
    def store(self) -> Store:
        return Store.for_url(self.url, self.options)

    @property
    def owner(self) -> str:
        """The lease owner of this process's claims: one name for every connection, so
        a reconnected consumer's keeper still renews the tasks its pool is running."""
        return process_owner()

    def establish_connection(self) -> Transport:
        """Fail fast: an unreachable server retries, missing tables stop with the fix.

        Always one round trip, even once the schema is known good: Kombu's reconnect
        loops (a producer's publish retry, the consumer's reconnect) wait between
        attempts only while this raises. Succeeding without asking the server made a
        publish retry use up its attempts within milliseconds of a restart.
        """
        self.store.check_schema(round_trip=True)
        result: Transport = super().establish_connection()
        self.acks.closed = self.connection_lost = False  # Kombu may reopen a closed transport
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
        self.acks.closed = True
        self.stopping.set()
        self.maintainer.detach()
        try:
            self.acks.flush(force=True)
        except Exception as exc:
            # The rows stay as they are: an unwritten early ack reads as unacked
            # (requeued, not failed, when its lease runs out), an unconsumed
            # transient message expires with its TTL.
            pending = self.acks.pending()
            logger.warning(
                "pgqueue could not write %d acks at close (%s); job ids: %s",
                len(pending),
                exc,
                ", ".join(str(j) for j, _ in pending),
            )
        super().close_connection(connection)
        self.poller.close()

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The URL for ``celery report`` and logs: password masked unless asked."""
        return urls.shown_uri(uri, include_password)

    def driver_version(self) -> str:
        return str(psycopg.__version__)

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"port": self.default_port, "hostname": "localhost"}

    # -- consuming: the poller does the work -------------------------------------------

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Synchronous consumers: deliver, else sleep on the LISTEN socket."""
        self.poller.drain_events(timeout)

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Sleep on the LISTEN socket; tick and a poll timer cover the rest."""
        self.poller.register_with_event_loop(loop)

    def unregister_from_event_loop(self, connection: Any, loop: Any) -> None:
        self.poller.unregister_from_event_loop(loop)

    def start_background(self) -> None:
        """Attach to the process's lease keeper; start maintenance (both idempotent).

        Called by the first consume, in event-loop and synchronous consumers alike.
        Lease renewal has a thread and a connection of its own (``leases.py``); this
        connection's thread writes deferred acks and runs maintenance on the pool, so
        neither a long maintenance pass nor an exhausted pool can delay a renewal.
        """
        self.maintainer.start()

    # -- what the lease keeper renews (LeaseSource) --------------------------------------

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


os.register_at_fork(after_in_child=Transport._after_fork_in_child)
