"""Settle a job's row when no pgqueue result backend will.

With the default early ack the broker learns nothing when a task ends, and a task
with ``ignore_result`` (or an app whose result backend is Redis, say) never calls
our backend. Without this a row would stay ``running`` until its lease lapsed and
retention could never prune it. Celery's task signals fire in every case, in the
process that ran the task, so that is where the row is settled. Writes are fenced
by the delivery's attempt number, like every other write to a held job.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any, cast

from celery import signals, states

from celery_pgqueue.delivery import DEFAULT_PRIORITY, attempt_of, job_of
from celery_pgqueue.options import DatabaseURL, PgQueueOptions
from celery_pgqueue.states import CELERY_TO_LOG, job_status_for
from celery_pgqueue.store import Store

logger = logging.getLogger("celery_pgqueue")


IGNORED_RESULT = {"ignored": True}
"""``jobs.result`` of a task whose result Celery ignored: the backend reads PENDING.

Only the worker knows for sure: ``send_task`` by name sends no ``ignore_result``, and
the task's own setting applies where it runs.
"""


@functools.cache
def _actual_ignore_result() -> Callable[[Any, Any], Any] | None:
    """Celery's own rule (5.6: ``celery.app.trace``, 5.7: ``celery.app.task``), if it has one."""
    for module in ("celery.app.task", "celery.app.trace"):
        rule = getattr(importlib.import_module(module), "get_actual_ignore_result", None)
        if rule is not None:
            return cast("Callable[[Any, Any], Any]", rule)
    return None


def _result_ignored(task: Any, request: Any, state: str = states.SUCCESS) -> bool:
    """Whether the worker of this Celery version skips storing ``state``.

    Celery 5.6+: the request's explicit ``ignore_result``, else the task's. Celery 5.5: a
    success is skipped if the task or the request says so, a failure, retry or revoke
    only if the task does.
    """
    rule = _actual_ignore_result()
    if rule is not None:
        return bool(rule(task, request))
    if getattr(task, "ignore_result", False):
        return True
    return state not in states.EXCEPTION_STATES and bool(getattr(request, "ignore_result", False))


def _backend_settles(task: Any, request: Any, state: str) -> bool:
    """Our result backend writes every state of tasks whose result it stores.

    Its class says so (``PgQueueBackend.settles_jobs``): no import of the backend in a
    worker whose result backend is another (a prefork child would pay it per child).
    """
    settles = getattr(type(task.backend), "settles_jobs", False) is True
    return settles and not _result_ignored(task, request, state)


def _marker(task: Any, request: Any, state: str) -> dict[str, bool] | None:
    """IGNORED_RESULT when Celery stored nothing for this outcome, else None (keep it).

    ``store_errors_even_if_ignored`` makes Celery store failures, retries and revokes
    of such a task after all: those stay readable.
    """
    if not _result_ignored(task, request, state):
        return None
    if state in states.EXCEPTION_STATES and getattr(task, "store_errors_even_if_ignored", False):
        return None
    return IGNORED_RESULT


_stores: dict[tuple[int, str], Store | None] = {}


def _store_for(app: Any) -> Store | None:
    """The store behind an app's pgqueue broker (None for other brokers), cached."""
    url = str(app.conf.broker_url or "")
    key = (id(app), url)
    if key not in _stores:
        store = None
        if url.startswith("pgqueue://"):
            options = PgQueueOptions.parse(app.conf.broker_transport_options or {})
            store = Store.for_url(DatabaseURL.parse(url), options)
        _stores[key] = store
    return _stores[key]


def _on_task_postrun(sender: Any = None, task_id: str = "", state: str = "", **kwargs: Any) -> None:
    task = kwargs.get("task") or sender
    if task is None or state == "REJECTED":
        # A rejected message is settled by the broker's reject: requeued or failed.
        return
    request = task.request
    attempt = attempt_of(getattr(request, "properties", None))
    if attempt is None or _backend_settles(task, request, state):
        return
    try:
        store = _store_for(task.app)
        if store is None:
            return
        retval = kwargs.get("retval")
        error = f"{type(retval).__name__}: {retval}" if isinstance(retval, BaseException) else None
        job_id = job_of(getattr(request, "properties", None), task_id)
        # Runs where the task ran (a pool child, a thread), before the worker acks, so
        # waiting out a restart here keeps the outcome instead of a "worker lost".
        store.retrying(
            lambda: store.finish(
                job_id,
                attempt=attempt,
                status=job_status_for(state),
                log_status=CELERY_TO_LOG.get(state),
                error_message=error,
                log_message=error[:1000] if error else None,
                result=_marker(task, request, state),
                max_attempts=(task.max_retries + 1) if task.max_retries is not None else None,
            ),
            what=f"the settle of job {task_id}",
        )
    except Exception as exc:  # never fail the task because bookkeeping failed
        logger.warning("pgqueue could not settle job %s: %s", task_id, exc)


def _on_task_revoked(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    if request is None:
        return
    message = getattr(request, "message", None)
    properties = getattr(message, "properties", None)
    attempt = attempt_of(properties)
    task = getattr(request, "task", None)
    if attempt is None or task is None or _backend_settles(task, request, "REVOKED"):
        return
    try:
        store = _store_for(task.app)
        if store is None:
            return
        reason = "expired" if kwargs.get("expired") else "revoked"
        store.finish(
            job_of(properties, request.id),
            attempt=attempt,
            status=job_status_for("REVOKED"),
            log_status=CELERY_TO_LOG["REVOKED"],
            log_message=reason,
            result=_marker(task, request, "REVOKED"),
        )
    except Exception as exc:
        logger.warning("pgqueue could not settle revoked job %s: %s", request.id, exc)


def _keep_priority_absent(
    properties: dict[str, Any] | None = None,
    headers: dict[str, Any] | None = None,
    body: Any = None,
    **kwargs: Any,
) -> None:
    """Mark "no priority given" so the queue's default_priority applies.

    Kombu's ``Producer.publish`` defaults ``priority`` to 0, so a task with no priority
    would be indistinguishable from one sent with ``priority=0``. Celery passes this
    dict on to ``publish(**properties)``: an explicit None survives, 0 stays 0. For
    other brokers None means their default, as before.

    A retry re-sends the ``delivery_info['priority']`` its worker saw, which is 0 for
    a task delivered without one (as on Redis): it keeps its queue's default instead
    of jumping ahead of every other task.
    """
    if properties is None:
        return
    properties.setdefault("priority", None)
    if properties["priority"] == 0 and _retry_of_unprioritised(headers, body):
        properties["priority"] = None


def _retry_of_unprioritised(headers: dict[str, Any] | None, body: Any) -> bool:
    """Whether this publish re-sends the running task, which was delivered without priority."""
    from celery import current_task

    request = getattr(current_task, "request", None)
    delivered = getattr(request, "properties", None) or {}
    if not delivered.get(DEFAULT_PRIORITY):
        return False
    task_id = (headers or {}).get("id")
    if task_id is None and isinstance(body, dict):  # task_protocol 1
        task_id = body.get("id")
    return task_id is not None and task_id == getattr(request, "id", None)


signals.before_task_publish.connect(_keep_priority_absent, weak=False)
signals.task_postrun.connect(_on_task_postrun, weak=False)
signals.task_revoked.connect(_on_task_revoked, weak=False)
