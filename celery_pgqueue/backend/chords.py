"""Groups and native chords: a chord counts its header in one row, no chord_unlock."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

from celery import states
from celery.app.task import Context
from celery.backends.base import Backend
from celery.canvas import _chain, chord, group, maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult, allow_join_result, result_from_tuple
from celery.utils.functional import _regen
from kombu.utils import json as kombu_json

from celery_pgqueue.ids import job_id_for
from celery_pgqueue.storable import strict_json

logger = logging.getLogger("celery_pgqueue")

CELERY_FAILS_CHAINS = hasattr(Backend, "_fail_chain")
"""Celery 5.7+ fails the rest of a chain in ``Backend._fail_chain``, following chord
bodies, and fails what comes after a failed chord's body. Before 5.7 ``mark_as_failure``
stores only the chain's own steps: :class:`GroupsAndChords` does the rest itself."""


class GroupsAndChords(Backend):  # type: ignore[misc]
    """Groups and chords of :class:`~celery_pgqueue.backend.PgQueueBackend`."""

    def _save_group(self, group_id: str, result: Any) -> Any:
        self.store.save_group(
            job_id_for(group_id), strict_json(kombu_json.dumps(result.as_tuple()))
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
                _publish_callback(app, callback, values)
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
        if CELERY_FAILS_CHAINS:
            super()._fail_chain(chain, exc, traceback, store_result=store_result, state=state)
        else:
            self._fail_steps(_steps(chain), exc, traceback, store_result, state)
        self._fail_unreached(chain, exc, traceback, store_result, state)

    def mark_as_failure(
        self,
        task_id: str,
        exc: Any,
        traceback: Any = None,
        request: Any = None,
        store_result: bool = True,
        call_errbacks: bool = True,
        state: str = states.FAILURE,
    ) -> None:
        """Before Celery 5.7: what its ``_fail_chain`` adds to the chain's own steps.

        Celery 5.5/5.6 store the failure for each later step of the chain but not for
        a chord step's body (what the chain's result waits on) nor a group's tasks.
        """
        super().mark_as_failure(
            task_id,
            exc,
            traceback=traceback,
            request=request,
            store_result=store_result,
            call_errbacks=call_errbacks,
            state=state,
        )
        if CELERY_FAILS_CHAINS or request is None:
            return
        chain = _steps(getattr(request, "chain", None))
        bodies = [body for step in chain if (body := _chord_body(step)) is not None]
        self._fail_steps(bodies, exc, traceback, store_result, state)
        self._fail_unreached(chain, exc, traceback, store_result, state)

    def chord_error_from_stack(self, callback: Any, exc: Any = None) -> Any:
        """Before Celery 5.7: fail a group body's tasks and what is chained after the body.

        Celery 5.5/5.6 store the error for the body's own id only: a group body's tasks
        and the steps after the body (a chain's, when the chord was a step of one) would
        stay PENDING.
        """
        info = super().chord_error_from_stack(callback, exc)
        if CELERY_FAILS_CHAINS:
            return info
        if exc is None:
            exc = info.exception if info is not None else None
        if isinstance(callback, group):
            cause = exc.__cause__ if isinstance(exc, ChordError) and exc.__cause__ else exc
            self._fail_unreached([callback], cause, None, True, states.FAILURE)
        elif isinstance(callback, _chain):  # a chord in a chain: the body carries the rest
            self._fail_chain(list(callback.tasks), exc)
        self._fail_chain(callback.options.get("chain"), exc)
        return info

    def _fail_steps(
        self, steps: list[Any], exc: Any, traceback: Any, store_result: bool, state: str
    ) -> None:
        """Celery 5.7's walk down failed chain steps, for older Celery.

        Each step with an id gets the failure, a chord member counts its part once (a
        part that already failed has counted), and a chord step hands on to its body.
        """
        pending = deque(steps)
        while pending:
            raw = pending.popleft()
            step = Context(raw)
            step.update(step.options)
            step.id = step.options.get("task_id")
            step.group = step.options.get("group_id")
            in_chord = "chord" in step.options
            failed_before = (
                in_chord
                and step.id is not None
                and self.get_state(step.id) in states.PROPAGATE_STATES
            )
            if store_result and state in states.PROPAGATE_STATES and step.id is not None:
                self.store_result(step.id, exc, state, traceback=traceback, request=step)
            if in_chord and not failed_before:
                self.on_chord_part_return(step, state, exc)
            body = _chord_body(raw)
            if body is not None:
                pending.append(body)

    def _fail_unreached(
        self, chain: Any, exc: Any, traceback: Any, store_result: bool, state: str
    ) -> None:
        """Store the failure for every group task and chord header a failed chain never ran."""
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
                raise _chord_error(f"Dependency {part.task_id} raised {cause!r}", cause)
            values.append(value)
        return values


def _steps(chain: Any) -> list[Any]:
    """A request's chain as a list (it may be None or a placeholder)."""
    try:
        return list(chain)
    except TypeError:
        return []


def _chord_body(step: Any) -> Any:
    """The body of a chain step that is a chord (as its message carries it), else None."""
    if getattr(step, "get", None) is None or step.get("subtask_type") != "chord":
        return None
    return (step.get("kwargs") or {}).get("body")


def _chord_error(message: str, cause: Any) -> ChordError:
    """A ChordError whose ``__cause__`` is the header part's own exception."""
    error = ChordError(message)
    if isinstance(cause, Exception):
        error.__cause__ = cause
    return error


def _publish_callback(app: Any, callback: Any, values: list[Any]) -> None:
    """Send a chord's body; Celery 5.7+ retries each of its messages on its own."""
    retry_publish = getattr(app.amqp, "_retry_publish", None)
    if retry_publish is None:  # before Celery 5.7, as its Redis backend does
        callback.delay(values)
    else:
        retry_publish(callback.delay, values)


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
