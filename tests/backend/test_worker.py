"""The result backend under a real worker, with the pgqueue broker and with another one.

Each test runs once per broker: with ``pgqueue`` the transport made the job's row and
every backend write is fenced by the delivery's attempt; with the in-memory broker
there is no row until the backend writes one.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import celery
import pytest
from celery import chain, chord, group, signals
from celery.exceptions import ChordError, TaskRevokedError
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import GroupResult, ResultSet
from helpers import CELERY_5_7, wait_until

from celery_pgqueue.backend import ResultNotSerializable, ResultTooLarge
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.store.notify import INLINE_RESULT_BYTES

from .conftest import Tasks, rows, running_worker

pytestmark = pytest.mark.worker


def test_get_returns_the_value_and_the_row_says_completed(worker_tasks: Tasks) -> None:
    t = worker_tasks
    result = t.add.delay(2, 3)

    assert result.get(timeout=10) == 5
    assert result.successful() and result.ready()
    job = t.job(result.id)
    assert job is not None
    assert job["status"] == "completed"
    assert job["completed_at"] is not None and job["failed_at"] is None
    assert job["result"]["status"] == "SUCCESS"
    assert job["result"]["result"] == 5, "json results are plain JSON an operator can read"
    assert job["attempt_count"] == 1
    assert job["max_attempts"] == 4, "Celery's default max_retries=3 -> 4 attempts"
    [attempt] = t.attempts(result.id)
    assert attempt["attempt_number"] == 1 and attempt["status"] == "success"
    assert attempt["finished_at"] >= attempt["started_at"]
    assert attempt["duration"] is not None


def test_results_either_side_of_the_notification_limit_come_back_whole(
    worker_tasks: Tasks,
) -> None:
    """A small success rides in its NOTIFY, a larger one is read back: get() can't tell."""
    t = worker_tasks
    when = datetime(2026, 11, 25, 12, 30, 45, 123456)
    value = {"when": when, "id": uuid.UUID(int=7), "text": "quote ' and space "}
    size = INLINE_RESULT_BYTES + 100
    small, large = t.echo.delay(value), t.big.delay(size)

    assert small.get(timeout=10) == value, "dates and UUIDs keep their types"
    assert large.get(timeout=10) == "x" * size
    for result in (small, large):
        job = t.job(result.id)
        assert job is not None
        assert abs((result.date_done - job["completed_at"]).total_seconds()) < 0.001


def test_failure_reraises_the_exception_class_with_its_message(worker_tasks: Tasks) -> None:
    t = worker_tasks
    result = t.fail.delay("card declined")

    with pytest.raises(ValueError, match="card declined"):
        result.get(timeout=10)
    assert result.state == "FAILURE" and result.failed()
    assert result.traceback is None, "tracebacks go to the worker's log, not the tier"
    job = t.job(result.id)
    assert job is not None
    assert job["status"] == "failed" and job["failed_at"] is not None
    assert job["last_error_message"] == "ValueError: card declined"
    assert job["result"]["result"]["exc_type"] == "ValueError"
    [attempt] = t.attempts(result.id)
    assert attempt["status"] == "failed"
    assert attempt["log_message"] == "ValueError: card declined"


def _ran(t: Tasks, task_id: str, key: str, status: str) -> bool:
    """The task ran; with the pgqueue broker, its row also reached ``status``."""
    if key not in t.finished_at:
        return False
    return t.broker != "pgqueue" or (t.job(task_id) or {}).get("status") == status


def test_ignore_result_reads_pending_while_the_row_says_completed(worker_tasks: Tasks) -> None:
    """Celery keeps nothing for ignore_result: PENDING, None, as on Redis."""
    t = worker_tasks
    on_task, per_call, by_name = (f"{k}-{uuid.uuid4()}" for k in ("task", "call", "name"))
    results = {
        on_task: t.quiet.delay(on_task),  # @app.task(ignore_result=True)
        per_call: t.timed.apply_async((per_call,), ignore_result=True),
        by_name: t.app.send_task("t.quiet", (by_name,)),  # only the worker knows
    }
    if tuple(celery.VERSION[:2]) == (5, 6):
        # Celery 5.6's send_task says ignore_result=False and the worker obeys the call,
        # so it stores the result (the same with Redis as broker and backend).
        del results[by_name]
    for key, result in results.items():
        wait_until(lambda r=result, k=key: _ran(t, r.id, k, "completed"), timeout=10)
        meta = t.app.backend.get_task_meta(result.id)
        assert (meta["status"], meta["result"]) == ("PENDING", None), key
        assert t.app.AsyncResult(result.id).state == "PENDING"
        if key != by_name:
            assert result.get(timeout=1) is None, "an ignored result returns None at once"
        if t.broker == "pgqueue":
            job = t.job(result.id)
            assert job is not None and job["completed_at"] is not None, "operators see it done"
            assert job["result"] == {"ignored": True}, "no result, only a marker"
            assert [a["status"] for a in t.attempts(result.id)] == ["success"]


def test_an_ignored_failure_reads_pending_unless_errors_are_kept(worker_tasks: Tasks) -> None:
    """store_errors_even_if_ignored decides, as in Celery; the row says failed either way."""
    t = worker_tasks
    dropped, kept = f"dropped-{uuid.uuid4()}", f"kept-{uuid.uuid4()}"
    quiet, loud = t.quiet_fail.delay(dropped), t.quiet_fail_kept.delay(kept)

    wait_until(lambda: _ran(t, quiet.id, dropped, "failed"), timeout=10)
    assert t.app.backend.get_task_meta(quiet.id)["status"] == "PENDING"
    wait_until(lambda: _ran(t, loud.id, kept, "failed"), timeout=10)
    with pytest.raises(ValueError, match="kept"):
        t.app.AsyncResult(loud.id).get(timeout=10)
    if t.broker == "pgqueue":
        job = t.job(quiet.id)
        assert job is not None and job["last_error_message"] == f"ValueError: quiet {dropped}"
        assert job["result"] == {"ignored": True}


def test_a_failure_ignored_per_call_is_kept_as_that_celery_keeps_it(worker_tasks: Tasks) -> None:
    """Celery 5.5 keeps a failure unless the task ignores results; 5.6+ obeys the call.

    As Celery does with Redis as broker and backend; the row says failed either way.
    """
    t = worker_tasks
    key = f"call-{uuid.uuid4()}"
    result = t.timed_fail.apply_async((key,), ignore_result=True)

    wait_until(lambda: _ran(t, result.id, key, "failed"), timeout=10)
    kept = tuple(celery.VERSION[:2]) < (5, 6)
    if kept:  # this result was sent as ignored: get() returns None; a new one reads it
        with pytest.raises(ValueError, match="timed"):
            t.app.AsyncResult(result.id).get(timeout=10)
    else:
        assert t.app.backend.get_task_meta(result.id)["status"] == "PENDING"
    if t.broker == "pgqueue":
        job = t.job(result.id)
        assert job is not None and job["last_error_message"] == f"ValueError: timed {key}"


def test_task_ignore_result_setting_reads_pending(
    backend_tasks: Callable[..., Tasks],
) -> None:
    t = backend_tasks(task_ignore_result=True)
    key = f"setting-{uuid.uuid4()}"
    with running_worker(t.app):
        result = t.timed.delay(key)
        wait_until(lambda: _ran(t, result.id, key, "completed"), timeout=10)
    assert t.app.backend.get_task_meta(result.id)["status"] == "PENDING"
    job = t.job(result.id)
    assert job is not None and job["result"] == {"ignored": True}


# Valid JSON that jsonb would refuse (NUL, a lone surrogate) or change (a float in
# exponent form comes back an integer, -0.0 loses its sign; Redis keeps them all).
ODD_JSON: dict[str, Any] = {
    "nul": "a\x00b",
    "key\x00": 1,
    "lone": "\ud800 alone",
    "pair": "\U0001f600",
    "big": 1e20,
    "huge": 1.5e300,
    "negative_zero": -0.0,
    "int": 2**70,
    "small": 1e-7,
}


def test_any_json_round_trips_exactly_as_args_and_result(worker_tasks: Tasks) -> None:
    t = worker_tasks
    odd, plain = t.echo.delay(ODD_JSON), t.echo.delay({"plain": [1, 2.5]})

    value = odd.get(timeout=10)
    assert value == ODD_JSON
    assert json.dumps(value) == json.dumps(ODD_JSON), "same types, same key order"
    assert math.copysign(1.0, value["negative_zero"]) == -1.0
    assert plain.get(timeout=10) == {"plain": [1, 2.5]}
    if t.broker == "pgqueue":
        [odd_job, plain_job] = [t.job(r.id) or {} for r in (odd, plain)]
        assert plain_job["payload"]["body"][0] == [{"plain": [1, 2.5]}], "readable JSON"
        assert plain_job["result"]["result"] == {"plain": [1, 2.5]}
        assert odd_job["payload"]["body_encoding"] == "base64", "only this row degrades"
        assert odd_job["result"]["result"]["content_type"] == "application/json"


def test_a_failure_message_with_nul_round_trips(worker_tasks: Tasks) -> None:
    t = worker_tasks
    result = t.fail.delay("bad\x00input \ud800")

    with pytest.raises(ValueError) as raised:
        result.get(timeout=10)
    assert str(raised.value) == "bad\x00input \ud800"
    if t.broker == "pgqueue":
        job = t.job(result.id) or {}
        assert job["last_error_message"] == "ValueError: bad\\x00input \\ud800"


def test_retry_n_times_leaves_one_job_and_n_plus_one_attempts(worker_tasks: Tasks) -> None:
    t = worker_tasks
    result = t.flaky.delay(3)

    assert result.get(timeout=20) == 3
    job = t.job(result.id)
    assert job is not None
    assert job["status"] == "completed"
    assert job["attempt_count"] == 4, "request.retries + 1"
    assert job["max_attempts"] == 6, "max_retries=5 -> 6 attempts"
    assert rows(t.database_url, "SELECT count(*) FROM jobs WHERE id = %s", job["id"]) == [(1,)]
    attempts = t.attempts(result.id)
    assert [a["attempt_number"] for a in attempts] == [1, 2, 3, 4]
    assert [a["status"] for a in attempts] == ["retry", "retry", "retry", "success"]
    assert attempts[0]["log_message"] == "retry in 0s: KeyError: try 0"
    assert all(a["finished_at"] is not None for a in attempts)


def test_max_retries_none_leaves_max_attempts_empty(worker_tasks: Tasks) -> None:
    result = worker_tasks.unlimited.delay()
    assert result.get(timeout=10) == "ok"
    job = worker_tasks.job(result.id)
    assert job is not None and job["max_attempts"] is None


def test_track_started_marks_the_job_running_with_an_open_attempt(worker_tasks: Tasks) -> None:
    t = worker_tasks
    t.gate.clear()
    result = t.tracked.delay()
    try:
        wait_until(lambda: result.state == "STARTED", timeout=10)
        assert result.info["hostname"], "Celery's STARTED meta (pid, hostname)"
        job = t.job(result.id)
        assert job is not None and job["status"] == "running" and job["started_at"]
        assert [(a["attempt_number"], a["status"]) for a in t.attempts(result.id)] == [
            (1, "attempting")
        ]
    finally:
        t.gate.set()
    assert result.get(timeout=10) == "tracked"
    assert [a["status"] for a in t.attempts(result.id)] == ["success"]


def test_retry_puts_the_job_back_in_line_until_its_next_run(worker_tasks: Tasks) -> None:
    t = worker_tasks
    result = t.later.delay()

    wait_until(lambda: result.state == "RETRY", timeout=10)
    assert isinstance(result.info, KeyError)
    job = t.job(result.id)
    assert job is not None and job["status"] == "queued"
    assert job["run_at"] > job["updated_at"], "run_at is the retry's countdown ahead"
    assert result.get(timeout=10) == 1
    assert [a["status"] for a in t.attempts(result.id)] == ["retry", "success"]


def test_custom_state_and_meta_are_kept_and_read_back(worker_tasks: Tasks) -> None:
    t = worker_tasks
    t.gate.clear()
    result = t.progress.delay(10)
    try:
        wait_until(lambda: result.state == "PROGRESS", timeout=10)
        assert result.info == {"done": 1, "total": 10}
        job = t.job(result.id)
        assert job is not None and job["status"] == "running"
        assert job["result"]["result"] == {"done": 1, "total": 10}
    finally:
        t.gate.set()
    assert result.get(timeout=10) == "finished"
    assert result.state == "SUCCESS"


def test_get_times_out_on_a_task_that_never_finishes(worker_tasks: Tasks) -> None:
    result = worker_tasks.app.AsyncResult(str(uuid.uuid4()))
    with pytest.raises(ResultTimeout):
        result.get(timeout=0.3)
    assert result.state == "PENDING", "no row: PENDING"


def test_chain_passes_each_result_on(worker_tasks: Tasks) -> None:
    t = worker_tasks
    result = chain(t.add.s(1, 2), t.add.s(3), t.add.s(4)).delay()
    assert result.get(timeout=10) == 10
    assert result.parent.get(timeout=10) == 6


def test_group_joins_natively_and_saves_and_restores(worker_tasks: Tasks) -> None:
    t = worker_tasks
    assert t.app.backend.supports_native_join
    result = group(t.add.s(i, i) for i in range(10)).delay()
    assert result.get(timeout=10) == [i * 2 for i in range(10)]
    assert result.ready() and result.successful() and result.completed_count() == 10

    result.save()
    restored = GroupResult.restore(result.id, app=t.app)
    assert restored is not None
    assert [r.id for r in restored.results] == [r.id for r in result.results]
    assert restored.join_native(timeout=5) == [i * 2 for i in range(10)]
    restored.delete()
    assert GroupResult.restore(result.id, app=t.app) is None


def test_result_set_join_collects_mixed_outcomes(worker_tasks: Tasks) -> None:
    t = worker_tasks
    results = ResultSet([t.add.delay(1, 1), t.fail.delay("nope"), t.add.delay(2, 2)])
    assert results.join(timeout=10, propagate=False)[0] == 2
    values = results.join_native(timeout=10, propagate=False)
    assert values[0] == 2 and isinstance(values[1], ValueError) and values[2] == 4
    assert results.failed() and not results.successful()


def test_chord_starts_its_body_with_the_header_results(worker_tasks: Tasks) -> None:
    t = worker_tasks
    result = chord([t.add.s(i, i) for i in range(10)], t.tsum.s()).delay()
    assert result.get(timeout=15) == 90
    assert rows(t.database_url, "SELECT count(*) FROM job_chord_parts") == [(0,)], (
        "parts are dropped once the body is published"
    )


def test_chord_in_a_chain(worker_tasks: Tasks) -> None:
    t = worker_tasks
    workflow = chain(t.add.s(1, 1), chord([t.add.s(i) for i in range(3)], t.tsum.s()), t.add.s(100))
    assert workflow.delay().get(timeout=15) == (2 + 3 + 4) + 100


def test_chord_of_chords(worker_tasks: Tasks) -> None:
    t = worker_tasks
    inner_a = chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s())
    inner_b = chord([t.add.s(3, 3), t.add.s(4, 4)], t.tsum.s())
    result = chord([inner_a, inner_b], t.tsum.s()).delay()
    assert result.get(timeout=20) == (2 + 4) + (6 + 8)


def test_chord_whose_header_holds_a_group_and_a_chain(worker_tasks: Tasks) -> None:
    t = worker_tasks
    header = [group(t.add.s(1, 1), t.add.s(2, 2)), chain(t.add.s(3, 3), t.add.s(10))]
    result = chord(header, t.tsum.s()).delay()
    assert result.get(timeout=20) == 2 + 4 + 16


def test_chord_body_can_be_a_group(worker_tasks: Tasks) -> None:
    t = worker_tasks
    result = chord([t.add.s(1, 1), t.add.s(2, 2)], group(t.tsum.s(), t.tsum.s())).delay()
    assert result.get(timeout=15) == [6, 6]


def test_a_failed_header_task_fails_the_chord_and_calls_its_errback(worker_tasks: Tasks) -> None:
    t = worker_tasks
    workflow = chord([t.add.s(1, 1), t.fail.s("header broke"), t.add.s(2, 2)], t.tsum.s())
    result = workflow.on_error(t.on_error.s()).delay()

    with pytest.raises(ChordError, match="header broke"):
        result.get(timeout=15, follow_parents=False)
    with pytest.raises(ValueError, match="header broke"):
        result.get(timeout=15)  # follow_parents: the header's own error first
    body = t.job(result.id)
    assert body is not None and body["status"] == "failed"
    assert body["last_error_message"].startswith("ChordError: Dependency")
    wait_until(lambda: any(task_id == result.id for task_id, _ in t.errbacks), timeout=10)
    [(_, message)] = [e for e in t.errbacks if e[0] == result.id]
    assert "header broke" in message


@pytest.mark.skipif(
    tuple(celery.VERSION[:2]) == (5, 6),
    reason="Celery 5.6 revokes a group body before failing its tasks and its workers store "
    "REVOKED over the failure (the same with Redis as broker and backend)",
)
def test_a_failed_header_fails_every_task_of_a_group_body(worker_tasks: Tasks) -> None:
    t = worker_tasks
    body = group(t.tsum.s(), t.tsum.s())
    result = chord([t.fail.s("no header"), t.add.s(1, 1)], body).delay()

    with pytest.raises(ValueError, match="no header"):
        result.get(timeout=15)  # each body task failed with the header's error
    for member in result.results:
        job = t.job(member.id)
        assert job is not None and job["status"] == "failed", "no body task left hanging"


def test_a_failure_reaches_every_task_of_a_later_group_that_never_ran(
    worker_tasks: Tasks,
) -> None:
    """Celery's test_error_propagates_from_chord (xfail on Redis, celery#6437), widened.

    The group is never published; its tasks (a plain one, a chain, a chord) still get
    the failure, so get() on the chain raises instead of waiting for its timeout.
    """
    t = worker_tasks
    later = group(
        t.add.s(1),
        t.add.s(1) | t.add.s(2),
        chord([t.add.s(1), t.add.s(2)], t.tsum.s()),
    )
    result = (t.add.s(1, 1) | t.fail.s() | later).delay()

    with pytest.raises(ValueError, match="2"):
        result.get(timeout=15)
    unpublished = [r.id for r in result.results]
    unpublished += [result.results[1].parent.id]  # the chain's first task
    unpublished += [r.id for r in result.results[2].parent.results]  # the chord's header
    for task_id in unpublished:
        member = t.app.AsyncResult(task_id)
        with pytest.raises(ValueError, match="2"):
            member.get(timeout=10)
        if t.broker == "pgqueue":
            job = t.job(task_id)
            assert job is not None and job["status"] == "failed" and job["attempt_count"] == 0


def test_a_failed_chord_header_fails_the_rest_of_its_chain(worker_tasks: Tasks) -> None:
    t = worker_tasks
    workflow = chain(
        chord([t.fail.s("header broke"), t.add.s(1, 1)], t.tsum.s()),
        t.add.s(1),
        group(t.add.s(1), t.add.s(2)),
    )
    result = workflow.delay()

    with pytest.raises(ChordError, match="header broke"):
        result.get(timeout=15)
    for member in result.results:
        with pytest.raises(ChordError, match="header broke"):
            member.get(timeout=10)


def test_link_error_runs_the_errback_of_a_failed_task(worker_tasks: Tasks) -> None:
    t = worker_tasks
    result = t.fail.apply_async(("linked",), link_error=t.on_error.s())
    with pytest.raises(ValueError):
        result.get(timeout=10)
    wait_until(lambda: (result.id, "ValueError: linked") in t.errbacks, timeout=10)


def test_forget_removes_the_job_and_its_logs(worker_tasks: Tasks) -> None:
    t = worker_tasks
    result = t.add.delay(1, 2)
    assert result.get(timeout=10) == 3
    assert t.attempts(result.id)

    result.forget()

    assert t.job(result.id) is None
    assert t.attempts(result.id) == []
    assert t.app.AsyncResult(result.id).state == "PENDING"


def test_revoke_before_start_reads_back_revoked(worker_tasks: Tasks) -> None:
    t = worker_tasks
    if t.broker == "redis" and not CELERY_5_7:
        pytest.skip(
            "before Celery 5.7 a worker holding a countdown task stores REVOKED only when "
            "its eta comes (the same with Redis as broker and result backend)"
        )
    result = t.add.apply_async((1, 1), countdown=60)

    result.revoke()

    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    assert result.state == "REVOKED"
    wait_until(lambda: (t.job(result.id) or {}).get("status") == "cancelled", timeout=10)


def test_results_that_cannot_be_stored_become_failures(worker_tasks: Tasks) -> None:
    t = worker_tasks
    limit = 65_536

    too_big = t.big.delay(limit + 1)
    with pytest.raises(ResultTooLarge, match="over the 65,536-byte limit"):
        too_big.get(timeout=10)

    odd = t.unencodable.delay()
    with pytest.raises(ResultNotSerializable, match="cannot be stored"):
        odd.get(timeout=10)

    nan = t.nan.delay()
    with pytest.raises(ResultNotSerializable, match="NaN"):
        nan.get(timeout=10)

    for result in (too_big, odd, nan):
        job = t.job(result.id)
        assert job is not None and job["status"] == "failed"
    assert t.add.delay(1, 1).get(timeout=10) == 2, "the worker carries on"


@pytest.mark.slow
def test_a_1000_task_chord_runs_its_body_once_without_chord_unlock(worker_tasks: Tasks) -> None:
    t = worker_tasks
    published: list[str] = []

    def on_publish(sender: str | None = None, **_: Any) -> None:
        published.append(str(sender))

    signals.before_task_publish.connect(on_publish, weak=False)
    try:
        result = chord([t.add.s(i, 1) for i in range(1000)], t.tsum.s()).delay()
        assert result.get(timeout=120) == sum(range(1000)) + 1000
    finally:
        signals.before_task_publish.disconnect(on_publish)
    assert "celery.chord_unlock" not in published
    assert published.count("t.tsum") == 1, "the body is published exactly once"
    [(size, done, started)] = rows(
        t.database_url,
        "SELECT chord_size, chord_done, chord_started_at FROM job_groups WHERE id = %s",
        job_id_for(result.parent.id),
    )
    assert (size, done) == (1000, 1000) and isinstance(started, datetime)
