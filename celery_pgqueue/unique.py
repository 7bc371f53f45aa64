"""Unique tasks: ``apply_async(..., unique_key="order-42")`` queues at most one live job.

Celery hands ``apply_async``'s unknown keywords to Kombu as message properties, so the
key reaches the transport as ``properties["unique_key"]``; the transport scopes it by
task name (:func:`stored_key`) and writes the job only if no queued or running job
holds it (``Broker.enqueue_unique``, decided by a partial unique index). Celery builds
the returned ``AsyncResult`` from the id it generated before publishing and drops what
the publish returns, so :func:`unique` wraps ``Celery.send_task``
(which ``apply_async`` and ``retry`` call): it derives the task's default key from the
arguments, opens a slot (:func:`holder_slot`) the transport fills with the holder's
task id, and returns that job's result instead. The hook (:mod:`celery_pgqueue_hook`)
wraps ``send_task`` when ``celery.app.base`` is imported and imports this module only
for the first publish that carries a key; apps on other brokers pass through untouched.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from celery_pgqueue.errors import ConfigurationError

#: The message property (and ``apply_async`` keyword, and task attribute) naming the key.
PROPERTY = "unique_key"

#: ``jobs.unique_key`` is varchar(255); longer keys are stored as a digest.
STORED_LIMIT = 255


def stored_key(task_name: str, key: str) -> str:
    """``jobs.unique_key`` for ``key`` of task ``task_name``: at most 255 characters.

    Readable ``"<task name>:<key>"`` when it fits and the name has no ``:``; else the
    name's first 120 characters (``:`` replaced) and ``#`` and the SHA-256 of both.
    The readable form always holds a ``:`` and the digest form never does, so two
    different (name, key) pairs never share a stored key.
    """
    readable = f"{task_name}:{key}"
    if ":" not in task_name and len(readable) <= STORED_LIMIT:
        return readable
    digest = hashlib.sha256(json.dumps([task_name, key]).encode()).hexdigest()
    return f"{task_name.replace(':', '_')[:120]}#{digest}"


def key_for(given: Any, default: Any, args: Any, kwargs: Any) -> str | None:
    """The key a publish carries, or None when it is not unique.

    ``given`` is ``apply_async``'s ``unique_key`` (None: not given), ``default`` the
    task's ``unique_key`` attribute. Each may be a string (or int), ``True`` (the
    arguments are the key), ``False`` (not unique); the default may also be a
    callable taking the task's arguments and returning a key or None.
    """
    choice = default if given is None else given
    if choice is None or choice is False:
        return None
    if choice is True:
        return json.dumps([list(args or ()), kwargs or {}], sort_keys=True, default=str)
    if callable(choice) and given is None:
        choice = choice(*(args or ()), **(kwargs or {}))
        if choice is None:
            return None
    if isinstance(choice, int) and not isinstance(choice, bool):
        choice = str(choice)
    if not isinstance(choice, str) or not choice:
        raise ConfigurationError(
            f"unique_key must be a non-empty string, an int, True or False, got {choice!r}"
        )
    return choice


class HolderSlot:
    """Filled by the transport when a unique publish found another job holding its key."""

    __slots__ = ("task_id",)

    def __init__(self) -> None:
        self.task_id: str | None = None


_slot: ContextVar[HolderSlot | None] = ContextVar("pgqueue_unique_holder", default=None)
_replaced: ContextVar[dict[str, str] | None] = ContextVar("pgqueue_unique_ids", default=None)


@contextlib.contextmanager
def replaced_ids() -> Iterator[dict[str, str]]:
    """Collect ``{generated task id: holder's task id}`` for the publishes in this block.

    A group builds its result from ids it generated before publishing and ignores
    what ``apply_async`` returns (:mod:`celery_pgqueue.batching` uses this, then
    :func:`redirect_group`).
    """
    replaced: dict[str, str] = {}
    token = _replaced.set(replaced)
    try:
        yield replaced
    finally:
        _replaced.reset(token)


def redirect_group(result: Any, replaced: dict[str, str]) -> Any:
    """Point a group's member results at the jobs that held their keys (in place).

    Only the group's own members are redirected; a promise already registered for a
    member (``result.then``) stays on the generated id, which never completes.
    """
    for member in getattr(result, "results", None) or ():
        holder = replaced.get(getattr(member, "id", None) or "")
        if holder is not None:
            member.id = holder
    return result


@contextlib.contextmanager
def holder_slot() -> Iterator[HolderSlot]:
    """A slot for the publishes made in this block (same thread or task)."""
    slot = HolderSlot()
    token = _slot.set(slot)
    try:
        yield slot
    finally:
        _slot.reset(token)


def report_holder(task_id: str) -> None:
    """Called by the transport: the publish in progress found ``task_id`` holding its key."""
    slot = _slot.get()
    if slot is not None:
        slot.task_id = task_id


def _task_default(task: Any) -> Any:
    """The task's ``unique_key`` as written: a function there stays a plain function.

    ``@app.task(unique_key=f)`` makes ``f`` a class attribute, which attribute access
    would bind to the task; ``f`` takes the task's arguments only.
    """
    if task is None:
        return None
    try:
        value = inspect.getattr_static(task, PROPERTY)
    except AttributeError:
        return None
    return value.__func__ if isinstance(value, staticmethod) else value


def _uses_pgqueue(app: Any) -> bool:
    return str(app.conf.broker_url or "").startswith("pgqueue")


def _holder_result(app: Any, sent: Any, task_id: str, result_cls: Any) -> Any:
    """The result to return for the holder, as ``send_task`` built ``sent``."""
    result = (result_cls or app.AsyncResult)(task_id)
    result.ignored = getattr(sent, "ignored", False)
    parent = app.current_worker_task
    children = getattr(getattr(parent, "request", None), "children", None)
    if isinstance(children, list):  # send_task put ``sent`` in its parent's trail
        children[:] = [result if child is sent else child for child in children]
    return result


def unique(send_task: Any) -> Any:
    """``Celery.send_task`` that honours ``unique_key`` (wrapped by the hook, once)."""

    @functools.wraps(send_task)
    def send_task_unique(
        self: Any, name: str, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any
    ) -> Any:
        task = options.get("task_type") or self._tasks.get(name)
        given = options.get(PROPERTY)
        # The common publish, with no key anywhere, pays two lookups here.
        if given is None and getattr(task, PROPERTY, None) is None:
            return send_task(self, name, args, kwargs, *rest, **options)
        if rest or not _uses_pgqueue(self):
            return send_task(self, name, args, kwargs, *rest, **options)
        default = _task_default(task)
        key = key_for(given, default, args, kwargs)
        options.pop(PROPERTY, None)
        if key is None:
            return send_task(self, name, args, kwargs, **options)
        if options.get("chord"):
            raise ConfigurationError(
                f"task {name!r}: a chord's header task cannot be unique (the chord would "
                "wait on a job outside it); drop unique_key for this call (unique_key=False)"
            )
        with holder_slot() as slot:
            sent = send_task(self, name, args, kwargs, **options, **{PROPERTY: key})
        if slot.task_id is None or slot.task_id == sent.id:
            return sent
        replaced = _replaced.get()
        if replaced is not None:
            replaced[sent.id] = slot.task_id
        return _holder_result(self, sent, slot.task_id, options.get("result_cls"))

    return send_task_unique
