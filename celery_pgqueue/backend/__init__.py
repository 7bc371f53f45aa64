"""pgqueue: Celery's result backend on PostgreSQL's Queue/Jobs tier.

A task's state, result and attempts live in its own ``jobs`` row (``jobs.id`` is the
task id) and its ``job_logs`` rows, next to the message the pgqueue transport stored;
groups and chord counters live in ``job_groups``. Waiting clients are woken by
LISTEN/NOTIFY instead of polling.

Features
========
* Broker: any. With ``pgqueue://`` the transport's row is reused and every write is
  fenced by the delivery's attempt number; with another broker (Redis, RabbitMQ...)
  the backend creates the row and records each attempt itself.
* State: ``jobs.status`` for the tier, Celery's state name in ``jobs.result``:

  ============================  ===========  =========================================
  Celery state                  jobs.status  also written
  ============================  ===========  =========================================
  (no row), PENDING             queued       a queued row reads back as PENDING
  STARTED (task_track_started)  running      attempt's job_logs row opened
  custom (update_state)         running      state name and meta kept in jobs.result
  RETRY                         queued       run_at = next attempt; log row -> retry
  SUCCESS                       completed    completed_at, result; log row -> success
  FAILURE                       failed       failed_at, last_error_message (type:
                                             message, 255 chars); log row -> failed
  REVOKED                       cancelled    log row (if any) -> failed; a task still
                                             queued past its ``expires`` reads REVOKED
                                             ("expired") and its first reader records it
  PENDING (ignore_result)       finished     jobs.result = {"ignored": true}
  ============================  ===========  =========================================

* Results: ``jobs.result`` is a JSON document an operator can read: with the json
  serializer the return value (or exception type, message and module) is inline JSON;
  other serializers store ``{"content_type", "encoding", "data": base64}`` for it.
  ``result_extended`` fields are read from the transport's ``jobs.payload`` (task
  name, args, kwargs, retries) and ``jobs.queue_name`` when they are there, and stored
  only when another broker leaves no payload. Tracebacks go to the worker's log, not
  the database (see ``store_traceback``).
* ``AsyncResult.get()`` sleeps until a NOTIFY carrying the task id arrives (sent in the
  transaction that writes the ready state); one LISTEN connection per process serves
  every waiter. With ``use_notify`` off it polls every ``polling_interval``.
* Native join and native chords: a chord counts its finished header tasks in one row
  and the last one starts the body exactly once; no ``celery.chord_unlock`` task.
* Retention: ``celery.backend_cleanup`` deletes expired jobs, their logs and groups in
  short batches; ``forget()`` deletes a job and its logs.

Connection string
=================
.. code-block::

    result_backend = "pgqueue://USER:PASSWORD@HOST:PORT/DBNAME?LIBPQ_PARAMETER=VALUE"

The transport's URL form. When broker and backend name the same database, the
process shares one connection pool between them.

Options
=======
``result_backend_transport_options`` takes the fields of
:class:`celery_pgqueue.options.PgQueueOptions`; unknown keys are refused. Those the
backend uses:

* ``use_notify`` (True): LISTEN/NOTIFY wake-ups; off behind PgBouncer in transaction
  pooling, then waiting clients poll.
* ``polling_interval`` (1.0 s): how often a waiting client polls without NOTIFY.
* ``max_payload_bytes`` (65,536): largest stored result document; a bigger result is
  stored as a FAILURE (``ResultTooLarge``) instead.
* ``max_canvas_bytes`` (1 MiB): cap on a result's ``children`` (the group a chain went
  on into, say), which do not count in ``max_payload_bytes``.
* ``store_traceback`` (False): keep the last 1,000 characters of a failure's
  traceback in ``job_logs.log_message`` and return it as ``AsyncResult.traceback``.
  Costs up to 1 KB per failed attempt in ``job_logs`` (kept ``log_retention``) and puts
  text that may quote data into the tier the seed reserves for short context.
* ``completed_retention`` (None: Celery's ``result_expires``), ``failed_retention``,
  ``log_retention``, ``prune_batch_size``: what ``backend_cleanup`` deletes, and how
  many rows per transaction.
* ``schema``, ``synchronous_commit``: as for the transport, and this backend's own.
* ``pool_size``, ``max_overflow``, ``pool_timeout``, ``connect_timeout``,
  ``prepared_statements``: the pool's; with a pgqueue broker on the same database and
  schema they must equal ``broker_transport_options``' (ConfigurationError otherwise).

Modules
=======
``core`` the class Celery loads, composed of ``storing`` (a state -> one row
change), ``reading`` (rows -> Celery's meta), ``encoding`` (the ``jobs.result``
document) and ``chords`` (groups, native chords, failed chains); ``waiting`` holds
the :class:`ResultConsumer` that ``get()`` sleeps in.
"""

from __future__ import annotations

from celery_pgqueue.backend.core import PgQueueBackend
from celery_pgqueue.backend.encoding import ResultNotSerializable, ResultTooLarge
from celery_pgqueue.backend.waiting import ResultConsumer

__all__ = ["PgQueueBackend", "ResultConsumer", "ResultNotSerializable", "ResultTooLarge"]
