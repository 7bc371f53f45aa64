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
* Unique tasks: a task message with the property ``unique_key`` (Celery's
  ``apply_async(unique_key=...)``) is written only if no queued or running job of that
  task holds the key (a partial unique index decides); see :mod:`celery_pgqueue.unique`

Connection string
=================
.. code-block::

    pgqueue://USER:PASSWORD@HOST:PORT/DBNAME?LIBPQ_PARAMETER=VALUE

The query string takes libpq parameters (``sslmode``, ``application_name``...).

Transport options
=================
Every field of :class:`celery_pgqueue.options.PgQueueOptions` (see the README's
configuration table); unknown keys are refused.

Modules
=======
* :mod:`.transport` -- :class:`Transport`, the connection Kombu sees, and its life
  (open, close, consumer restart, fork);
* :mod:`.channel` -- :class:`Channel`: publish, consume, declare, bind;
* :mod:`.qos` -- :class:`QoS`: acks, rejects and restores on the rows, deliveries
  kept across a consumer restart;
* :mod:`.poller` -- LISTEN, the wake-up socket, the poll timer, claiming and delivery;
* :mod:`.draining` -- the same for synchronous consumers (``drain_events()``);
* :mod:`.herd` -- which of the idle workers woken by one NOTIFY claims (one at once,
  the others after a short hold, dropped if the queue was drained meanwhile);
* :mod:`.acks` -- the buffer that batches acks onto the next claim;
* :mod:`.maintainer` -- the maintenance runner (deferred acks, rescue, retention);
* :mod:`.leases` -- the process's lease keeper (attached on the first consume);
* :mod:`.messages` -- a message's row, and a claimed row's message;
* :mod:`.routing` -- the bindings cache, Celery's own names, revoke-to-cancel;
* :mod:`.publish` -- Kombu's publish batches (many publishes, one INSERT);
* :mod:`.url` -- the connection string and options.

At run time each imports only modules listed after it: no import cycles (the
references back, for type hints, sit under ``TYPE_CHECKING``).
"""

from __future__ import annotations

# Imported for their signal handlers (settling rows the result backend won't; running
# delivered tasks now, whatever the worker's clock says).
from celery_pgqueue import clock, finalize
from celery_pgqueue.transport.channel import Channel
from celery_pgqueue.transport.maintainer import run_maintenance
from celery_pgqueue.transport.qos import QoS
from celery_pgqueue.transport.transport import Transport

__all__ = ["Channel", "QoS", "Transport", "clock", "finalize", "run_maintenance"]
