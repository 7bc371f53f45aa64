"""Reading states: stored rows as Celery's meta, one query for many waiting tasks."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable, Iterator, Mapping
from time import monotonic, sleep
from typing import Any

from celery import states
from celery.backends.base import Backend
from celery.exceptions import TimeoutError as ResultTimeout
from kombu.serialization import loads

from celery_pgqueue.ids import job_id_for
from celery_pgqueue.states import EXPIRED_MESSAGE, JobStatus, job_status_for
from celery_pgqueue.store.notify import ResultNote
from celery_pgqueue.store.results import StoredResult

logger = logging.getLogger("celery_pgqueue")

# FINISHED job statuses -> the Celery state a row reads as when the backend did not
# write that status itself (a rescued job, a transport-cancelled one).
_DERIVED_STATE = {
    JobStatus.COMPLETED.value: states.SUCCESS,
    JobStatus.FAILED.value: states.FAILURE,
    JobStatus.CANCELLED.value: states.REVOKED,
}


class StateReading(Backend):  # type: ignore[misc]
    """Reads of :class:`~celery_pgqueue.backend.PgQueueBackend`: rows -> Celery's meta."""

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
