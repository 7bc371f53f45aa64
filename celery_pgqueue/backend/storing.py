"""Storing states: the row change (:class:`StateWrite`) that records a task's state."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from time import monotonic
from typing import Any

from celery import signals, states
from celery.backends.base import Backend
from celery.exceptions import Retry

from celery_pgqueue import clock, relay
from celery_pgqueue.backend.encoding import error_summary
from celery_pgqueue.delivery import attempt_of
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.states import CELERY_TO_LOG, job_status_for
from celery_pgqueue.store.batches import Finish
from celery_pgqueue.store.results import StateWrite

TRACEBACK_LIMIT = 1_000
SUMMARY_LIMIT = 255

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


class StateStoring(Backend):  # type: ignore[misc]
    """Writes of :class:`~celery_pgqueue.backend.PgQueueBackend`: one state, one statement."""

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
        if write.transport_owned and self._relayed(write):
            return result
        # A task's outcome waits out a restart (and a pooled session the server closed)
        # instead of failing the task and leaving its row to lease rescue.
        self.store.retrying(
            lambda: self.store.write_state(write, notify=self.options.use_notify),
            what=f"the {state} state of task {task_id}",
        )
        return result

    def _relayed(self, write: StateWrite) -> bool:
        """Whether the node's completion writer committed ``write`` (a prefork pool
        process handing its finish over, :mod:`celery_pgqueue.relay`)."""
        client = relay.client()
        if client is None:
            return False
        finish = Finish(
            job_id=write.job_id,
            attempt=write.attempt,
            status=write.status,
            log_status=write.log_status,
            result=write.document,
            max_attempts=write.max_attempts,
            error_message=write.error_message,
            log_message=write.log_message,
            notify=self.options.use_notify and write.ready,
        )
        return client.send(finish) is not None

    def _state_write(
        self, task_id: str, result: Any, state: str, traceback: str | None, request: Any
    ) -> StateWrite:
        """The row change that records ``state`` for ``task_id``."""
        delivered = attempt_of(getattr(request, "properties", None))
        transport_owned = delivered is not None
        attempt = delivered if transport_owned else _attempt_of(request, state)
        error = error_summary(result) if state in states.EXCEPTION_STATES else None
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
