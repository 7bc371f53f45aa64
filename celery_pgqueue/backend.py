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
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from time import monotonic, sleep
from typing import Any
from uuid import UUID

from celery import signals, states
from celery.app.task import Context
from celery.backends.asynchronous import AsyncBackendMixin, BaseResultConsumer, Drainer
from celery.backends.base import Backend, _create_chord_error_with_cause
from celery.canvas import _chain, chord, group, maybe_signature
from celery.exceptions import ChordError, Retry
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import GroupResult, allow_join_result, result_from_tuple
from celery.utils.functional import _regen
from kombu.exceptions import EncodeError
from kombu.serialization import dumps, loads, prepare_accept_content
from kombu.utils import json as kombu_json

from celery_pgqueue import clock
from celery_pgqueue.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    PayloadNotSerializable,
    PayloadTooLarge,
)
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.options import (
    DatabaseURL,
    PgQueueOptions,
    completed_retention,
    first_url,
    pool_conflict,
)
from celery_pgqueue.states import CELERY_TO_LOG, EXPIRED_MESSAGE, JobStatus, job_status_for
from celery_pgqueue.storable import jsonb_keeps_text
from celery_pgqueue.store import Store
from celery_pgqueue.store.notify import ResultListener, ResultNote
from celery_pgqueue.store.results import StateWrite, StoredResult

__all__ = ["PgQueueBackend", "ResultConsumer", "ResultNotSerializable", "ResultTooLarge"]

logger = logging.getLogger("celery_pgqueue")

JSON = "application/json"
TRACEBACK_LIMIT = 1_000
SUMMARY_LIMIT = 255
WAKE_INTERVAL = 1.0
"""Longest single sleep in get(): ``on_interval`` (parent errors) runs at least this often."""
RESYNC_INTERVAL = 10.0
"""A listening client still re-reads what it waits for this often, for rows finished by
something that sent no NOTIFY (an operator's SQL, a transport that cancels a row)."""
EXPIRY_LOOKUP_AFTER = WAKE_INTERVAL
"""A client that has waited this long on a task asks once when it expires (if ever), so
a ``get()`` on a task nobody runs raises TaskRevokedError when it expires, while a
``get()`` that returns sooner costs no query."""

# FINISHED job statuses -> the Celery state a row reads as when the backend did not
# write that status itself (a rescued job, a transport-cancelled one).
_DERIVED_STATE = {
    JobStatus.COMPLETED.value: states.SUCCESS,
    JobStatus.FAILED.value: states.FAILURE,
    JobStatus.CANCELLED.value: states.REVOKED,
}


class ResultTooLarge(PayloadTooLarge, EncodeError):  # type: ignore[misc]
    """A result over ``max_payload_bytes``: the task is stored as failed with this error."""


class ResultNotSerializable(PayloadNotSerializable, EncodeError):  # type: ignore[misc]
    """A result the ``result_serializer`` cannot encode: stored as this task's failure."""


# -- when did this attempt start? ------------------------------------------------------
# With another broker the backend opens the attempt's log row itself; unless the task
# tracks STARTED, the first write it sees is the last, so the start is taken here: on
# the monotonic clock, stored as the database's now() minus the time since (a worker
# whose wall clock is off must not shift started_at or the duration).
_attempt_starts: dict[str, float] = {}


def _on_task_prerun(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _attempt_starts[task_id] = monotonic()


def _on_task_postrun(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _attempt_starts.pop(task_id, None)


signals.task_prerun.connect(_on_task_prerun, weak=False, dispatch_uid="celery_pgqueue.prerun")
signals.task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid="celery_pgqueue.postrun")


_consumers: weakref.WeakSet[ResultConsumer] = weakref.WeakSet()


def _reset_consumers_after_fork() -> None:
    for consumer in list(_consumers):
        consumer.on_after_fork()


os.register_at_fork(after_in_child=_reset_consumers_after_fork)


class ResultConsumer(BaseResultConsumer):  # type: ignore[misc]
    """Waits for results on behalf of one backend (one per thread, like Celery's).

    The process's :class:`ResultListener` thread reads the LISTEN socket and calls
    :meth:`notified`; a waiting thread sleeps on a condition until a job it waits for
    is named, then reads those jobs in one query. Without NOTIFY (option off, or the
    connection down) it reads everything it waits for every ``polling_interval``, so a
    database that went away surfaces as DatabaseUnavailable instead of a hang.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The listener thread does the socket work and waiters only sleep on a
        # condition, so Celery's greenlet drainers (a loop around drain_events) would
        # add nothing but a second reader.
        self.drainer = Drainer(self)
        self._reset()

    def _reset(self, resync: bool = False) -> None:
        # Reentrant: AsyncResult.__del__ (cancel_for) can run from the garbage collector
        # on a thread that already holds it.
        self._cond = threading.Condition(threading.RLock())
        self._wanted: dict[str, str] = getattr(self, "_wanted", {})  # str(jobs.id) -> task id
        # Expiry of what we wait for: since when (monotonic), asked already, and when
        # each waited-for task expires by the database's clock (as a monotonic time).
        self._since: dict[str, float] = getattr(self, "_since", {})
        self._expiry_asked: set[str] = getattr(self, "_expiry_asked", set())
        self._expiry_due: dict[str, float] = getattr(self, "_expiry_due", {})
        self._notified: set[str] = set()
        self._inline: dict[str, ResultNote] = {}  # successes their notification carried
        self._resync_due = resync
        self._generation = 0
        self._last_full_read = monotonic()
        _consumers.add(self)

    def on_after_fork(self) -> None:
        # The lock may have been held by a thread that did not survive the fork. What
        # this consumer waits for stays: results inherited from the parent are still
        # pending, and the first wait re-reads them.
        self._reset(resync=True)

    # -- called by Celery ------------------------------------------------------------

    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def consume_from(self, task_id: str) -> None:
        with self._cond:
            key = str(job_id_for(task_id))
            self._wanted[key] = task_id
            self._since.setdefault(key, monotonic())
        listener = self._listener()
        if listener is not None:
            listener.register(self)
            listener.ensure_listening()

    def cancel_for(self, task_id: str) -> None:
        key = str(job_id_for(task_id))
        with self._cond:
            self._wanted.pop(key, None)
            self._notified.discard(key)
            self._inline.pop(key, None)
            self._since.pop(key, None)
            self._expiry_asked.discard(key)
            self._expiry_due.pop(key, None)

    def stop(self) -> None:
        listener = self._listener()
        if listener is not None:
            listener.unregister(self)

    def on_wait_for_pending(self, result: Any, **kwargs: Any) -> None:
        # Read once after subscribing: a task may have finished before we listened.
        for meta in result._iter_meta(**kwargs):
            if meta is not None:
                self.on_state_change(meta, None)

    def drain_events_until(
        self, p: Any, timeout: float | None = None, on_interval: Any = None
    ) -> Iterator[None]:
        """Wait until ``p`` is ready; unlike Celery's Drainer, connection errors propagate.

        Celery's Drainer swallows OSError and retries forever; DatabaseUnavailable is a
        ConnectionError, and a client waiting on a database that went away must get it.
        """
        deadline = None if timeout is None else monotonic() + timeout
        while not p.ready:
            wait = WAKE_INTERVAL
            if deadline is not None:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    raise TimeoutError()  # socket.timeout: Celery turns it into its own
                wait = min(wait, remaining)
            self.drain_events(timeout=wait)
            yield
            if on_interval:
                on_interval()

    def drain_events(self, timeout: float | None = None) -> None:
        """Sleep until an awaited job is notified (or ``timeout``), then read it."""
        backend = self.backend
        listener = self._listener()
        listening = listener is not None and listener.listening
        wait = WAKE_INTERVAL if timeout is None else timeout
        if not listening:
            wait = min(wait, backend.options.polling_interval)
        with self._cond:
            if self._expiry_due:
                wait = min(wait, max(0.0, min(self._expiry_due.values()) - monotonic()))
            generation = self._generation
            self._cond.wait_for(
                lambda: self._has_work(listening) or self._generation != generation, wait
            )
            full = (
                not listening
                or self._resync_due
                or monotonic() - self._last_full_read >= RESYNC_INTERVAL
            )
            carried: list[tuple[str, ResultNote]] = []
            if full:
                ids = list(self._wanted.values())
                self._resync_due = False
                self._last_full_read = monotonic()
            else:
                ids = []
                for key in self._notified:
                    task_id = self._wanted.get(key)
                    if task_id is None:
                        continue
                    note = self._inline.get(key)
                    if note is not None and not backend._extended:
                        carried.append((task_id, note))
                    else:
                        ids.append(task_id)
            self._notified.clear()
            self._inline.clear()
            now = monotonic()
            expiring = [k for k, at in self._expiry_due.items() if at <= now]
            unasked = [
                k
                for k, since in self._since.items()
                if k not in self._expiry_asked and now - since >= EXPIRY_LOOKUP_AFTER
            ]
        try:
            for task_id, note in carried:
                self.on_state_change(backend._carried_meta(task_id, note), None)
            if ids:
                for meta in backend._ready_metas(ids):
                    self.on_state_change(meta, None)
            if expiring or unasked:
                self._mind_expiry(expiring, unasked)
        finally:
            with self._cond:
                self._generation += 1
                self._cond.notify_all()

    # -- called by the listener thread -----------------------------------------------

    def notified(self, notes: Mapping[str, ResultNote | None]) -> None:
        with self._cond:
            hits = self._wanted.keys() & notes.keys()
            if hits:
                self._notified |= hits
                for key in hits:
                    note = notes[key]
                    if note is not None:
                        self._inline[key] = note
                self._cond.notify_all()

    def resync(self) -> None:
        with self._cond:
            self._resync_due = True
            self._cond.notify_all()

    # -- internals -------------------------------------------------------------------

    def _mind_expiry(self, expiring: list[str], unasked: list[str]) -> None:
        """Record the waited-for tasks whose ``expires`` passed; learn when others expire.

        Nobody may consume the queue (no worker, or a busy one): without this a
        ``get()`` would wait for maintenance or forever. The database decides what has
        expired; its NOTIFY (or the re-read asked for here) then wakes us with REVOKED.
        """
        store = self.backend.store
        if expiring:
            if store.expire_tasks([UUID(k) for k in expiring]):
                self.resync()
            with self._cond:
                for key in expiring:
                    self._expiry_due.pop(key, None)
            unasked = [*unasked, *expiring]  # not expired yet by the database: ask again
        left = store.seconds_to_expiry([UUID(k) for k in unasked])
        now = monotonic()
        with self._cond:
            for key in unasked:
                if key not in self._wanted:
                    continue
                self._expiry_asked.add(key)
                seconds = left.get(UUID(key))
                if seconds is not None:
                    self._expiry_due[key] = now + max(0.0, seconds)

    def _has_work(self, listening: bool) -> bool:
        return self._resync_due or (listening and bool(self._notified))

    def _listener(self) -> ResultListener | None:
        if not self.backend.options.use_notify:
            return None
        listener: ResultListener = self.backend.store.result_listener()
        return listener


class PgQueueBackend(Backend, AsyncBackendMixin):  # type: ignore[misc]
    """Celery result backend on the Queue/Jobs tier; see the module docstring."""

    ResultConsumer = ResultConsumer

    supports_native_join = True
    supports_autoexpire = False
    persistent = True

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, url=url, **kwargs)
        self.url = url or app.conf.result_backend
        self.database_url = DatabaseURL.parse(self.url)
        self.options = PgQueueOptions.parse(app.conf.result_backend_transport_options or {})
        _check_shared_pool(app, self.database_url, self.options)
        self._store: Store | None = None
        self._inline_json = self.content_type == JSON
        self._task_accept = prepare_accept_content(app.conf.accept_content)
        self.result_consumer = self.ResultConsumer(
            self, self.app, self.accept, self._pending_results, self._pending_messages
        )

    @property
    def store(self) -> Store:
        """The process's shared store for this database (checked once for the schema)."""
        if self._store is None:
            # Our own view on the process's pool: our options govern our work even
            # when the broker opened the pool.
            store = Store.for_url(self.database_url, self.options)
            store.check_schema()
            self._store = store
        return self._store

    def as_uri(self, include_password: bool = False) -> str:
        if include_password:
            return str(self.url)
        return self.database_url.masked()

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        return super().__reduce__(args, dict(kwargs or {}, url=self.url))

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """With ``result_backend_always_retry``: retry only a lost connection."""
        return isinstance(exc, DatabaseUnavailable)

    @property
    def _extended(self) -> bool:
        return bool(self.app.conf.find_value_for_key("extended", "result"))

    # -- writing ---------------------------------------------------------------------

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        write = self._state_write(task_id, result, state, traceback, request)
        # A task's outcome waits out a restart (and a pooled session the server closed)
        # instead of failing the task and leaving its row to lease rescue.
        self.store.retrying(
            lambda: self.store.write_state(write, notify=self.options.use_notify),
            what=f"the {state} state of task {task_id}",
        )
        return result

    def _state_write(
        self, task_id: str, result: Any, state: str, traceback: str | None, request: Any
    ) -> StateWrite:
        """The row change that records ``state`` for ``task_id``."""
        delivered = _delivered_attempt(request)
        transport_owned = delivered is not None
        attempt = delivered if transport_owned else _attempt_of(request, state)
        error = _error_summary(result) if state in states.EXCEPTION_STATES else None
        retry_in, retry_at = _retry_eta() if state == states.RETRY else (None, None)
        document = self._document(result, state, request, transport_owned)
        return StateWrite(
            job_id=job_id_for(task_id),
            status=job_status_for(state),
            log_status=CELERY_TO_LOG.get(state),
            document=self._encode_document(document, task_id, state, request),
            ready=state in states.READY_STATES,
            attempt=attempt,
            transport_owned=transport_owned,
            queue_name=self._queue_of(request),
            error_message=error,
            log_message=self._log_message(state, error, traceback, retry_in, retry_at),
            max_attempts=self._max_attempts(request),
            # run_at = the database's now() + the interval, whatever this clock says.
            retry_in=retry_in,
            started_ago=None if transport_owned else _started_ago(task_id),
        )

    def _document(
        self, value: Any, state: str, request: Any, transport_owned: bool
    ) -> dict[str, Any]:
        """Celery's meta, minus what the row already says (dates, queue, traceback)."""
        document: dict[str, Any] = {"status": state, "result": value}
        children = self.current_task_children(request)
        if children:
            document["children"] = children
        if request is not None:
            if getattr(request, "group", None):
                document["group_id"] = request.group
            if getattr(request, "parent_id", None):
                document["parent_id"] = request.parent_id
        if self._extended and request is not None:
            document["worker"] = getattr(request, "hostname", None)
            if not transport_owned:  # no payload to read them from
                delivery = getattr(request, "delivery_info", None) or {}
                document.update(
                    name=getattr(request, "task", None),
                    args=getattr(request, "args", None),
                    kwargs=getattr(request, "kwargs", None),
                    retries=getattr(request, "retries", None),
                    queue=delivery.get("routing_key"),
                )
            if getattr(request, "stamps", None):
                document["stamped_headers"] = request.stamped_headers
                document.update(
                    {
                        k: v
                        for k, v in request.stamps.items()
                        if k in (request.stamped_headers or ())
                    }
                )
        return document

    def _encode_document(
        self, document: dict[str, Any], task_id: str, state: str, request: Any
    ) -> Any:
        """``jobs.result``: strict JSON (what ``jsonb`` accepts), within ``max_payload_bytes``.

        A value that can't be stored raises an EncodeError Celery's tracer turns into
        the task's FAILURE. The failure itself must always fit: its message is cut and
        stored args dropped rather than raise while recording it.
        """
        limit = self.options.max_payload_bytes
        try:
            text, value = self._stored_json(document)
        except (EncodeError, TypeError, ValueError) as exc:
            if state not in states.EXCEPTION_STATES:
                name = getattr(request, "task", None) or "task"
                raise ResultNotSerializable(
                    f"the result of {name}[{task_id}] cannot be stored with "
                    f"result_serializer={self.serializer!r}: {_first_line(exc)}; "
                    "return plain values (str, int, float, bool, None, list, dict)"
                ) from exc
            text, value = self._stored_json(_shrunk_failure(document, limit))
        size = len(text.encode())
        canvas_limit = self.options.max_canvas_bytes
        if size <= min(limit, canvas_limit):
            return value
        # The children (a chain's next group, say) are Celery's canvas bookkeeping: they
        # count under max_canvas_bytes, as they do in the message that started them.
        canvas = 0
        if document.get("children"):
            bare = {k: v for k, v in document.items() if k != "children"}
            canvas = size - len(self._stored_json(bare)[0].encode())
        if size - canvas <= limit and canvas <= canvas_limit:
            return value
        if state in states.EXCEPTION_STATES:
            return self._stored_json(_shrunk_failure(document, limit))[1]
        name = getattr(request, "task", None) or "task"
        if size - canvas > limit:
            raise ResultTooLarge(
                f"the result of {name}[{task_id}] is {size - canvas:,} bytes encoded, over "
                f"the {limit:,}-byte limit (max_payload_bytes in "
                "result_backend_transport_options); the queue tier keeps ids and small "
                "values: store large data elsewhere and return its id"
            )
        raise ResultTooLarge(
            f"the children of {name}[{task_id}] are {canvas:,} bytes encoded, over the "
            f"{canvas_limit:,}-byte limit (max_canvas_bytes in "
            "result_backend_transport_options); raise the option or start fewer tasks "
            "from one task"
        )

    def _stored_json(self, document: dict[str, Any]) -> tuple[str, Any]:
        """``document`` as JSON text and value, exactly as ``jsonb`` will keep it.

        Valid JSON that jsonb refuses or changes (NUL, lone surrogates, ``1e+20``,
        ``-0.0``) is rare: only then are result, args and kwargs enveloped (base64 of
        their JSON text, as for other serializers), and only in that row.
        """
        text = self._serialize(document)
        value = _strict_json(text)
        if jsonb_keeps_text(text, value):
            return text, value
        text = self._serialize(document, envelope=True)
        value = _strict_json(text)
        if not jsonb_keeps_text(text, value):
            raise ValueError(
                "it holds text PostgreSQL cannot store (NUL, an unpaired surrogate) "
                "outside the result, args and kwargs"
            )
        return text, value

    def _serialize(self, document: dict[str, Any], envelope: bool = False) -> str:
        """The document as JSON text: inline values (json), else enveloped ones."""
        if self._inline_json and not envelope:
            _, _, text = dumps(document, serializer=self.serializer)
            return text.decode() if isinstance(text, bytes) else str(text)
        document = dict(document)
        wrapped = [k for k in ("result", "args", "kwargs") if document.get(k) is not None]
        for key in wrapped:
            document[key] = self._envelope(document[key])
        document["encoded"] = wrapped
        return str(kombu_json.dumps(document))

    def _envelope(self, value: Any) -> dict[str, Any]:
        content_type, encoding, data = dumps(value, serializer=self.serializer)
        raw = data if isinstance(data, bytes) else str(data).encode(encoding or "utf-8")
        return {
            "content_type": content_type,
            "encoding": encoding,
            "data": base64.b64encode(raw).decode("ascii"),
        }

    def _queue_of(self, request: Any) -> str:
        delivery = getattr(request, "delivery_info", None) or {}
        queue = delivery.get("routing_key")
        if not queue and request is not None:
            task = self.app.tasks.get(getattr(request, "task", None) or "")
            queue = getattr(task, "queue", None)
        return str(queue or self.app.conf.task_default_queue or "celery")

    def _max_attempts(self, request: Any) -> int | None:
        task = self.app.tasks.get(getattr(request, "task", None) or "")
        max_retries = getattr(task, "max_retries", None)
        return None if max_retries is None else int(max_retries) + 1

    def _log_message(
        self,
        state: str,
        error: str | None,
        traceback: str | None,
        retry_in: float | None,
        retry_at: datetime | None,
    ) -> str | None:
        if state == states.FAILURE and self.options.store_traceback and traceback:
            return traceback[-TRACEBACK_LIMIT:]
        if state == states.RETRY:
            when = (
                f"retry at {retry_at.isoformat()}"
                if retry_at
                else f"retry in {retry_in:g}s"
                if retry_in is not None
                else "retry"
            )
            return f"{when}: {error}"[:SUMMARY_LIMIT] if error else when
        return error[:SUMMARY_LIMIT] if error else None

    # -- reading ---------------------------------------------------------------------

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        rows = self.store.read_results(
            [job_id_for(task_id)],
            with_payload=self._extended,
            with_failure_log=self.options.store_traceback,
        )
        if not rows:
            return {"task_id": task_id, "status": states.PENDING, "result": None}
        self._record_expired(rows)
        return self._meta(rows[0], task_id)

    def _carried_meta(self, task_id: str, note: ResultNote) -> dict[str, Any]:
        """The meta of a success from what its notification carried (no read)."""
        row = StoredResult(
            id=job_id_for(task_id),
            status=JobStatus.COMPLETED.value,
            result_json=note.result_json,
            last_error_message=None,
            finished_at=note.finished_at,
            queue_name="",
        )
        return self._meta(row, task_id)

    def _ready_metas(self, task_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Metas of those tasks that are ready, in one query."""
        by_job = {job_id_for(t): t for t in task_ids}
        rows = self.store.read_results(
            list(by_job),
            ready_only=True,
            with_payload=self._extended,
            with_failure_log=self.options.store_traceback,
        )
        self._record_expired(rows)
        return [self._meta(row, by_job[row.id]) for row in rows]

    def _record_expired(self, rows: Iterable[StoredResult]) -> None:
        """The reader that first sees a task expired in its queue records it: the row
        ends ``cancelled`` with its log row even when no worker ever looks at it."""
        expired = [row.id for row in rows if row.expired]
        if not expired:
            return
        try:
            self.store.expire_tasks(expired)
        except Exception as exc:  # the read itself succeeded; maintenance records it later
            logger.warning(
                "pgqueue could not record expired jobs %s as cancelled: %s",
                ", ".join(map(str, expired)),
                exc,
            )

    def get_many(
        self,
        task_ids: Iterable[str],
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_message: Any = None,
        on_interval: Any = None,
        max_iterations: int | None = None,
        READY_STATES: frozenset[str] = states.READY_STATES,
        **kwargs: Any,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(task_id, meta)`` as tasks become ready, reading all of them at once."""
        interval = 0.5 if interval is None else interval
        ids = set(task_ids)
        for task_id in list(ids):
            cached = self._cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                ids.discard(task_id)
                yield task_id, cached
        iterations = 0
        started = monotonic()
        while ids:
            for meta in self._ready_metas(ids):
                task_id = meta["task_id"]
                ids.discard(task_id)
                self._cache[task_id] = meta
                if on_message is not None:
                    on_message(meta)
                yield task_id, meta
            iterations += 1
            if not ids or (max_iterations and iterations >= max_iterations):
                break
            elapsed = monotonic() - started
            if timeout is not None and elapsed >= timeout:
                raise ResultTimeout(f"Operation timed out ({timeout})")
            if on_interval:
                on_interval()
            sleep(interval if timeout is None else min(interval, timeout - elapsed))

    def _meta(self, row: StoredResult, task_id: str) -> dict[str, Any]:
        """Celery's meta for a stored row, exceptions rebuilt."""
        document = self._decode_document(row.result_json) if row.result_json else {}
        stored = document.get("status")
        # A task still queued past its expires is REVOKED already: the database's
        # clock decided, whoever records it (maintenance, a waiting client, a worker).
        if row.expired:
            state = states.REVOKED
        else:
            state = _state_of(row.status, stored, document.get("ignored") is True)
        if state == stored:
            result = document.get("result")
        elif state == states.FAILURE:
            result = _exception_from_summary(row.last_error_message)
        elif state == states.REVOKED:
            expired = row.expired or row.last_error_message == EXPIRED_MESSAGE
            result = {
                "exc_type": "TaskRevokedError",
                "exc_module": "celery.exceptions",
                "exc_message": ["expired" if expired else "revoked"],
            }
        else:
            result = None
        meta: dict[str, Any] = {
            "task_id": task_id,
            "status": state,
            "result": result,
            "traceback": row.failure_log if state == states.FAILURE else None,
            "children": document.get("children") or [],
            "date_done": row.finished_at if state in states.READY_STATES else None,
        }
        for key in ("group_id", "parent_id"):
            if document.get(key):
                meta[key] = document[key]
        if self._extended:
            extended = {
                "name": document.get("name"),
                "args": document.get("args"),
                "kwargs": document.get("kwargs"),
                "worker": document.get("worker"),
                "retries": document.get("retries"),
                "queue": row.queue_name,
            }
            if row.payload:
                extended.update(self._from_payload(row.payload))
            meta.update(extended)
        return dict(self.meta_from_decoded(meta))

    def _decode_document(self, text: str) -> dict[str, Any]:
        document: dict[str, Any] = kombu_json.loads(text)
        for key in document.pop("encoded", None) or ():
            envelope = document.get(key)
            if isinstance(envelope, Mapping):
                raw = base64.b64decode(envelope["data"])
                document[key] = loads(
                    raw, envelope["content_type"], envelope["encoding"], accept=self.accept
                )
        return document

    def _from_payload(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Task name, args, kwargs and retries from the message the transport stored."""
        headers = payload.get("headers") or {}
        found: dict[str, Any] = {}
        if headers.get("task"):
            found["name"] = headers["task"]
        if headers.get("retries") is not None:
            found["retries"] = headers["retries"]
        body = payload.get("body")
        try:
            if payload.get("body_encoding") == "json":
                decoded = body
            elif body is not None:
                raw = base64.b64decode(body) if payload.get("body_encoding") == "base64" else body
                decoded = loads(
                    raw,
                    payload.get("content-type"),
                    payload.get("content-encoding"),
                    accept=self._task_accept,
                )
            else:
                decoded = None
        except Exception:  # an unreadable body just means no args in the meta
            decoded = None
        if isinstance(decoded, (list, tuple)) and len(decoded) >= 2:
            found["args"], found["kwargs"] = decoded[0], decoded[1]
        return found

    # -- forget, retention -------------------------------------------------------------

    def _forget(self, task_id: str) -> None:
        self.store.delete([job_id_for(task_id)])

    def forget(self, task_id: str) -> None:
        super().forget(task_id)
        self.result_consumer.cancel_for(task_id)

    def cleanup(self) -> None:
        """``celery.backend_cleanup``: delete expired finished jobs, logs and groups.

        Completed and cancelled jobs older than ``completed_retention`` (default:
        ``result_expires``), failed ones older than ``failed_retention``, in batches of
        ``prune_batch_size`` rows per transaction.
        """
        retention = completed_retention(self.options, self.expires)
        counts = self.store.prune(completed_retention=retention)
        groups = self.store.prune_groups(older_than=retention)
        logger.info(
            "pgqueue cleanup: %d completed, %d cancelled, %d failed jobs, %d logs, %d groups",
            counts.completed,
            counts.cancelled,
            counts.failed,
            counts.logs,
            groups,
        )

    # -- groups ------------------------------------------------------------------------

    def _save_group(self, group_id: str, result: Any) -> Any:
        self.store.save_group(
            job_id_for(group_id), _strict_json(kombu_json.dumps(result.as_tuple()))
        )
        return result

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        text = self.store.group(job_id_for(group_id))
        if text is None:
            return None
        return {"result": result_from_tuple(kombu_json.loads(text), self.app)}

    def _delete_group(self, group_id: str) -> None:
        self.store.delete_group(job_id_for(group_id))

    # -- native chords -----------------------------------------------------------------

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        """Nothing to start: the header tasks count themselves (no chord_unlock).

        A header that holds groups (a chord of chords, say) is saved so the body gets
        results shaped as the header was, as the Redis backend does.
        """
        self.ensure_chords_allowed()
        if isinstance(header_result_args[1], _regen):
            return
        header_result = self.app.GroupResult(*header_result_args)
        if any(isinstance(r, GroupResult) for r in header_result.results):
            header_result.save(backend=self)

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        self.store.set_chord_size(job_id_for(group_id), int(chord_size))

    def add_to_chord(self, group_id: str, result: Any) -> None:
        self.store.add_to_chord(job_id_for(group_id), 1)

    def on_chord_part_return(
        self, request: Any, state: str, result: Any, propagate: Any = None, **kwargs: Any
    ) -> Any:
        """Count this header part; the part that completes the count starts the body."""
        group_id, task_id = request.group, request.id
        if not group_id or not task_id:
            return None
        claimed = self.store.count_chord_part(
            job_id_for(group_id), job_id_for(task_id), request.group_index, state
        )
        if not claimed:
            return None
        app = self.app
        callback = maybe_signature(request.chord, app=app)
        try:
            try:
                values = self._chord_values(group_id)
            except ChordError as exc:
                logger.error("Chord %r raised: %r", group_id, exc)
                return self.chord_error_from_stack(callback, exc)
            except Exception as exc:
                logger.exception("Chord %r raised: %r", group_id, exc)
                return self.chord_error_from_stack(callback, ChordError(f"Join error: {exc!r}"))
            try:
                app.amqp._retry_publish(callback.delay, values)
            except Exception as exc:
                logger.exception("Chord callback for %r raised: %r", group_id, exc)
                return self.chord_error_from_stack(callback, ChordError(f"Callback error: {exc!r}"))
            return None
        finally:
            self.store.forget_chord_parts(job_id_for(group_id))

    # -- failures down a chain --------------------------------------------------------

    def _fail_chain(
        self,
        chain: Any,
        exc: Any,
        traceback: Any = None,
        store_result: bool = True,
        state: str = states.FAILURE,
    ) -> None:
        """Celery's propagation down the rest of a failed chain, reaching into groups.

        Celery stores the failure for each later step that has an id of its own and
        follows chord bodies, but a group's tasks (and a chord's header), never
        published because an earlier step failed, would stay PENDING: ``get()`` on
        the chain waits for its timeout (celery#6437; Redis fails the same way). Any
        task id can have a row here, so each of them gets the failure too.
        """
        super()._fail_chain(chain, exc, traceback, store_result=store_result, state=state)
        if not store_result or state not in states.PROPAGATE_STATES:
            return
        tasks = list(_unreached_tasks(chain, self.app))
        if not tasks:
            return
        result = self.encode_result(exc, state)
        writes = []
        for task in tasks:
            request = Context(
                {**task, **task.options, "id": task.id, "group": task.options.get("group_id")}
            )
            writes.append(self._state_write(task.id, result, state, traceback, request))
        # One statement for a group of any size: each member's waiter is woken at once.
        self.store.retrying(
            lambda: self.store.write_unrun_states(writes, notify=self.options.use_notify),
            what=f"the {state} state of {len(writes)} tasks a failed chain never started",
        )

    def _chord_values(self, group_id: str) -> list[Any]:
        """The header's results in header order; ChordError if a part failed."""
        header = GroupResult.restore(group_id, app=self.app, backend=self)
        if header is not None:
            # Saved by apply_chord: its shape (nested groups) is the body's argument.
            header.on_ready()
            with allow_join_result():
                values: list[Any] = header.join_native(
                    timeout=self.app.conf.result_chord_join_timeout, propagate=True
                )
            return values
        values = []
        for part in self.store.chord_parts(job_id_for(group_id)):
            # A header task that ignored its result has no document: its value is None.
            document = self._decode_document(part.result_json) if part.result_json else {}
            value = document.get("result")
            if part.state in states.PROPAGATE_STATES:
                cause = self.exception_to_python(value) if value else ChordError(part.state)
                raise _create_chord_error_with_cause(
                    message=f"Dependency {part.task_id} raised {cause!r}", original_exc=cause
                )
            values.append(value)
        return values


# -- helpers ---------------------------------------------------------------------------


def _unreached_tasks(steps: Any, app: Any) -> Iterator[Any]:
    """The tasks inside the rest of a chain that Celery's ``_fail_chain`` leaves alone.

    It stores each step's own id and follows a chord step into its body; what it never
    reaches is a group's tasks and a chord's header, at any depth.
    """
    try:
        pending = deque(steps)
    except TypeError:  # a request's chain may be None or a placeholder
        return
    while pending:
        step = maybe_signature(pending.popleft(), app=app)
        if isinstance(step, chord):
            yield from _tasks_in(step.tasks, app)
            if step.body is not None:
                pending.append(step.body)  # Celery follows the body: so do we
        elif isinstance(step, (group, _chain)):
            yield from _tasks_in(step, app)


def _tasks_in(canvas: Any, app: Any) -> Iterator[Any]:
    """Every task signature with an id inside ``canvas``, at any depth."""
    if isinstance(canvas, (list, tuple)):  # a chord's header, as its message carries it
        for task in canvas:
            yield from _tasks_in(task, app)
        return
    sig = maybe_signature(canvas, app=app)
    if isinstance(sig, chord):
        yield from _tasks_in(sig.tasks, app)
        if sig.body is not None:
            yield from _tasks_in(sig.body, app)
    elif isinstance(sig, (group, _chain)):
        yield from _tasks_in(sig.tasks, app)
    elif sig is not None and sig.id:
        yield sig


def _check_shared_pool(app: Any, url: DatabaseURL, ours: PgQueueOptions) -> None:
    """Refuse at start, not at the first result, options the shared pool cannot honour.

    A pgqueue broker on the same database and schema shares one connection pool per
    process with this backend: its size and its prepared statements cannot differ by
    role, so they must agree (every other option stays each role's own).
    """
    broker = first_url(app.conf.broker_url)
    if broker is None or not broker.lower().startswith("pgqueue://"):
        return
    try:
        theirs = PgQueueOptions.parse(app.conf.broker_transport_options or {})
        same_pool = DatabaseURL.parse(broker).key() == url.key()
    except ConfigurationError:
        return  # the broker reports its own mistakes when it starts
    if not same_pool or theirs.schema != ours.schema:
        return
    conflict = pool_conflict(theirs, ours)
    if conflict is not None:
        name, broker_value, backend_value = conflict
        raise ConfigurationError(
            f"pgqueue option {name!r} is {broker_value!r} in broker_transport_options but "
            f"{backend_value!r} in result_backend_transport_options; the broker and the "
            f"result backend on {url.masked()} share one connection pool per process, so "
            f"give {name} the same value in both"
        )


def _delivered_attempt(request: Any) -> int | None:
    """The attempt number the pgqueue transport stamped on this delivery, if any."""
    properties = getattr(request, "properties", None) or {}
    attempt = properties.get("pgqueue_attempt") if isinstance(properties, Mapping) else None
    return int(attempt) if attempt is not None else None


def _attempt_of(request: Any, state: str) -> int | None:
    """With another broker: attempt = retries + 1, for requests a worker executed.

    A revoke, a chord error or a failed chain marks tasks that never ran: no attempt.
    """
    if request is None or not getattr(request, "hostname", None):
        return None
    if state in (states.PENDING, states.RECEIVED):
        return None
    return int(getattr(request, "retries", 0) or 0) + 1


def _started_ago(task_id: str) -> float | None:
    started = _attempt_starts.get(task_id)
    return None if started is None else max(0.0, monotonic() - started)


def _retry_eta() -> tuple[float | None, datetime | None]:
    """RETRY's next run, from the Retry being handled (Celery passes only its cause).

    ``Task.retry`` raises ``Retry(when=eta or countdown)``; the tracer stores RETRY
    while handling it, so it is the exception in flight. Returns the interval (an
    ``eta`` read on this process's clock, as Celery computed it) and the eta, if any.
    """
    exc = sys.exc_info()[1]
    if isinstance(exc, Retry):
        when = exc.when
        if isinstance(when, datetime):
            eta = when if when.tzinfo else when.replace(tzinfo=UTC)
            return clock.seconds_until(eta), eta
        if isinstance(when, (int, float)) and not isinstance(when, bool):
            return float(when), None
    return None, None


def _error_summary(value: Any) -> str | None:
    """``Type: message`` of a stored exception (json dict or pickled instance)."""
    if isinstance(value, BaseException):
        name, text = type(value).__name__, str(value)
    elif isinstance(value, Mapping) and "exc_type" in value:
        name = str(value["exc_type"])
        message = value.get("exc_message")
        if isinstance(message, (list, tuple)):
            text = (
                "" if not message else str(message[0]) if len(message) == 1 else str(tuple(message))
            )
        else:
            text = "" if message is None else str(message)
    else:
        return None
    return f"{name}: {text}" if text else name


def _exception_from_summary(summary: str | None) -> dict[str, Any]:
    """An exception for a row failed by something else (rescue after a lost worker)."""
    name, _, message = (summary or "Error: job failed").partition(": ")
    if not name.isidentifier():
        name, message = "Error", summary or "job failed"
    return {"exc_type": name, "exc_module": None, "exc_message": [message]}


def _state_of(status: str, stored: str | None, ignored: bool = False) -> str:
    """The Celery state a row reads as.

    The backend's own state name wins while it agrees with ``jobs.status``; a row
    finished by something else (lease rescue, a cancel) reads as that status implies.
    A queued row is PENDING (or RETRY, when the backend put it back for a retry); a
    running one is PENDING until the backend stored a state for it. A task whose
    result Celery ignored (``ignore_result``; the worker marks its row, see
    ``finalize.IGNORED_RESULT``) reads as Celery stored nothing: PENDING, while
    ``jobs.status`` still says how it ended, for operators.
    """
    if ignored:
        return str(stored or states.PENDING)
    if status in _DERIVED_STATE:
        if stored and job_status_for(stored).value == status:
            return str(stored)
        return str(_DERIVED_STATE[status])
    if status == JobStatus.QUEUED.value:
        return str(states.RETRY if stored == states.RETRY else states.PENDING)
    if stored and stored not in states.READY_STATES:
        return str(stored)
    return str(states.PENDING)


def _strict_json(text: str) -> Any:
    """``text`` parsed, refusing NaN and Infinity: not JSON, whatever Python writes."""
    return json.loads(text, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _shrunk_failure(document: dict[str, Any], limit: int) -> dict[str, Any]:
    """A failure document that always encodes and fits: message cut, stored args dropped."""
    shrunk = {k: v for k, v in document.items() if k not in ("args", "kwargs")}
    value = document.get("result")
    summary = _error_summary(value) or "Error"
    name, _, message = summary.partition(": ")
    module = value.get("exc_module") if isinstance(value, Mapping) else type(value).__module__
    room = max(64, limit // 4)
    shrunk["result"] = {
        "exc_type": name,
        "exc_module": module,
        "exc_message": [message[:room]],
    }
    shrunk.pop("children", None)
    return shrunk


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
