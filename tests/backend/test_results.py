"""What the backend writes into jobs.result and reads back, without a worker.

The backend is driven the way Celery's tracer drives it (``store_result`` with the
task's request); rows are checked with plain SQL, as an operator would read them.
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from celery import group, states
from celery.app.task import Context
from celery.exceptions import TaskRevokedError

from celery_pgqueue.backend import PgQueueBackend, ResultNotSerializable, ResultTooLarge
from celery_pgqueue.errors import ConfigurationError
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.store import NewJob

from .conftest import Tasks, rows


class OrderRejected(Exception):
    """A user exception with two arguments, for the pickle serializer."""

    def __init__(self, order: int, reason: str) -> None:
        super().__init__(order, reason)
        self.order, self.reason = order, reason


def request(task_id: str, **fields: Any) -> Context:
    """The request Celery's tracer passes for a task a worker ran (another broker)."""
    values: dict[str, Any] = {
        "id": task_id,
        "task": "t.add",
        "hostname": "worker-1@host",
        "retries": 0,
        "args": [1, 2],
        "kwargs": {"fast": True},
        "delivery_info": {"routing_key": "orders"},
        "properties": {},
    }
    values.update(fields)
    return Context(values)


def stored(tasks: Tasks, task_id: str) -> dict[str, Any]:
    job = tasks.job(task_id)
    assert job is not None
    return job


def test_json_results_are_readable_json_and_keep_their_types(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks()
    backend = tasks.app.backend
    task_id = str(uuid.uuid4())
    value = {
        "total": Decimal("12.50"),
        "when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "ref": uuid.UUID(int=7),
        "items": [1, "two", None, True],
    }

    backend.store_result(task_id, value, states.SUCCESS, request=request(task_id))

    job = stored(tasks, task_id)
    assert job["queue_name"] == "orders", "routing_key of the delivery"
    assert job["result"]["result"]["items"] == [1, "two", None, True]
    [(total,)] = rows(
        tasks.database_url,
        "SELECT result->'result'->'items'->>1 FROM jobs WHERE id = %s",
        job_id_for(task_id),
    )
    assert total == "two"
    assert tasks.app.AsyncResult(task_id).get(timeout=1) == value


def test_other_serializers_store_an_envelope(backend_tasks: Callable[..., Tasks]) -> None:
    tasks = backend_tasks(
        result_serializer="pickle", result_accept_content=["pickle", "json"], result_extended=True
    )
    backend = tasks.app.backend
    ok, failed = str(uuid.uuid4()), str(uuid.uuid4())

    backend.store_result(ok, {1, 2, 3}, states.SUCCESS, request=request(ok))
    backend.store_result(
        failed, OrderRejected(42, "no stock"), states.FAILURE, request=request(failed)
    )

    envelope = stored(tasks, ok)["result"]["result"]
    assert envelope["content_type"] == "application/x-python-serialize"
    assert pickle.loads(__import__("base64").b64decode(envelope["data"])) == {1, 2, 3}
    assert tasks.app.AsyncResult(ok).get(timeout=1) == {1, 2, 3}
    assert tasks.app.AsyncResult(ok).args == [1, 2], "args enveloped too, read back"
    with pytest.raises(OrderRejected) as raised:
        tasks.app.AsyncResult(failed).get(timeout=1)
    assert (raised.value.order, raised.value.reason) == (42, "no stock")
    assert stored(tasks, failed)["last_error_message"] == "OrderRejected: (42, 'no stock')"


def test_a_task_id_that_is_not_a_uuid_maps_to_a_stable_row(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks()
    tasks.app.backend.store_result("order-42", "shipped", states.SUCCESS)

    assert stored(tasks, "order-42")["id"] == job_id_for("order-42")
    assert tasks.app.AsyncResult("order-42").get(timeout=1) == "shipped"


def test_results_the_tier_cannot_hold_are_refused_with_the_fix(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks(backend_options={"max_payload_bytes": 1_000})
    backend = tasks.app.backend

    with pytest.raises(ResultTooLarge, match=r"over the 1,000-byte limit \(max_payload_bytes"):
        backend.store_result(str(uuid.uuid4()), "x" * 2_000, states.SUCCESS)
    with pytest.raises(ResultNotSerializable, match="NaN"):
        backend.store_result(str(uuid.uuid4()), float("nan"), states.SUCCESS)
    with pytest.raises(ResultNotSerializable, match="not JSON serializable"):
        backend.store_result(str(uuid.uuid4()), object(), states.SUCCESS)
    assert rows(tasks.database_url, "SELECT count(*) FROM jobs") == [(0,)]

    escaped = str(uuid.uuid4())
    backend.store_result(escaped, "a literal \\u0000 is just text", states.SUCCESS)
    assert tasks.app.AsyncResult(escaped).get(timeout=1) == "a literal \\u0000 is just text"


def test_a_results_children_count_under_the_canvas_cap_not_the_payload_limit(
    backend_tasks: Callable[..., Tasks],
) -> None:
    """A task whose chain went on into a big group records the group as its child."""
    tasks = backend_tasks(backend_options={"max_payload_bytes": 2_000})
    app, backend = tasks.app, tasks.app.backend
    children = [app.GroupResult(str(uuid.uuid4()), [app.AsyncResult(str(uuid.uuid4()))] * 500)]
    task_id = str(uuid.uuid4())
    spawned = request(task_id)
    spawned.children.extend(children)  # what apply_async inside the task does

    backend.store_result(task_id, 1, states.SUCCESS, request=spawned)

    assert app.AsyncResult(task_id).get(timeout=1) == 1
    assert len(app.AsyncResult(task_id).children[0].results) == 500

    small = backend_tasks(backend_options={"max_payload_bytes": 2_000, "max_canvas_bytes": 4_096})
    with pytest.raises(ResultTooLarge, match=r"4,096-byte limit \(max_canvas_bytes"):
        small.app.backend.store_result(task_id, 1, states.SUCCESS, request=spawned)


def test_a_failed_chain_fails_later_group_tasks_in_one_write_but_never_a_success(
    backend_tasks: Callable[..., Tasks],
) -> None:
    """What Celery's tracer does when a chain step fails: the rest of the chain fails."""
    tasks = backend_tasks()
    app, backend = tasks.app, tasks.app.backend
    step = group(tasks.add.s(1), tasks.add.s(2), tasks.add.s(3))
    ids = [r.id for r in step.freeze().results]
    backend.store_result(ids[0], 5, states.SUCCESS)  # ran already (a hand-made case)
    failed_id = str(uuid.uuid4())
    backend.mark_as_failure(
        failed_id, ValueError("upstream"), request=request(failed_id, chain=[dict(step)])
    )

    assert app.AsyncResult(ids[0]).get(timeout=1) == 5, "a success is never overwritten"
    for task_id in ids[1:]:
        with pytest.raises(ValueError, match="upstream"):
            app.AsyncResult(task_id).get(timeout=1)
        row = stored(tasks, task_id)
        assert (row["status"], row["attempt_count"]) == ("failed", 0)
        assert row["last_error_message"] == "ValueError: upstream"


def test_a_failure_is_always_stored_even_when_its_message_is_huge(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks(backend_options={"max_payload_bytes": 2_000})
    task_id = str(uuid.uuid4())

    tasks.app.backend.store_result(
        task_id, ValueError("y" * 50_000), states.FAILURE, request=request(task_id)
    )

    with pytest.raises(ValueError, match=r"^yyyy") as raised:
        tasks.app.AsyncResult(task_id).get(timeout=1)
    assert len(str(raised.value)) < 2_000
    assert stored(tasks, task_id)["last_error_message"] == "ValueError: " + "y" * 243


def test_tracebacks_stay_out_unless_store_traceback_is_on(
    backend_tasks: Callable[..., Tasks],
) -> None:
    trace = "Traceback (most recent call last):\n" + "  frame\n" * 500 + "ValueError: bad\n"
    plain, kept = backend_tasks(), backend_tasks(backend_options={"store_traceback": True})
    for tasks in (plain, kept):
        task_id = str(uuid.uuid4())
        tasks.app.backend.store_result(
            task_id, ValueError("bad"), states.FAILURE, traceback=trace, request=request(task_id)
        )
        tasks.app.backend._cache.clear()
        result = tasks.app.AsyncResult(task_id)
        [log] = tasks.attempts(task_id)
        if tasks is plain:
            assert result.traceback is None
            assert log["log_message"] == "ValueError: bad"
        else:
            assert result.traceback == trace[-1000:]
            assert log["log_message"] == trace[-1000:]


def test_rows_finished_by_someone_else_read_as_their_status_implies(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks()
    store = tasks.app.backend.store
    queued, lost, cancelled = (str(uuid.uuid4()) for _ in range(3))
    store.enqueue(
        [NewJob(id=job_id_for(t), queue_name="celery", payload=None) for t in (queued, lost)]
    )
    store.enqueue([NewJob(id=job_id_for(cancelled), queue_name="celery", payload=None)])
    rows(
        tasks.database_url,
        "UPDATE jobs SET status = 'failed', failed_at = now(),"
        " last_error_message = 'WorkerLostError: worker lost while running the task'"
        " WHERE id = %s RETURNING id",
        job_id_for(lost),
    )
    store.cancel([job_id_for(cancelled)])

    assert tasks.app.AsyncResult(queued).state == "PENDING", "a queued row is PENDING"
    with pytest.raises(Exception, match="worker lost while running the task") as raised:
        tasks.app.AsyncResult(lost).get(timeout=1)
    assert type(raised.value).__name__ == "WorkerLostError"
    with pytest.raises(TaskRevokedError):
        tasks.app.AsyncResult(cancelled).get(timeout=1)


def test_extended_fields_come_from_the_transport_payload_without_copies(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks(result_extended=True)
    store = tasks.app.backend.store
    task_id = str(uuid.uuid4())
    payload = {
        "body": [[4, 5], {"fast": False}, {"callbacks": None}],
        "body_encoding": "json",
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {"task": "t.add", "id": task_id, "retries": 0},
        "properties": {},
        "exchange": "",
        "routing_key": "celery",
    }
    store.enqueue([NewJob(id=job_id_for(task_id), queue_name="celery", payload=payload)])
    [claimed] = store.claim("celery", 1, "test")
    delivered = request(task_id, properties={"pgqueue_attempt": claimed.attempt}, args=[4, 5])

    tasks.app.backend.store_result(task_id, 9, states.SUCCESS, request=delivered)

    document = stored(tasks, task_id)["result"]
    assert "args" not in document and "name" not in document, "read from payload instead"
    result = tasks.app.AsyncResult(task_id)
    assert result.get(timeout=1) == 9
    assert (result.name, result.args, result.kwargs) == ("t.add", [4, 5], {"fast": False})
    assert (result.queue, result.worker, result.retries) == ("celery", "worker-1@host", 0)
    assert isinstance(result.date_done, datetime)


def test_extended_fields_with_another_broker_are_stored_in_the_result(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks(result_extended=True)
    task_id = str(uuid.uuid4())
    tasks.app.backend.store_result(task_id, 3, states.SUCCESS, request=request(task_id))

    document = stored(tasks, task_id)["result"]
    assert (document["name"], document["args"], document["queue"]) == ("t.add", [1, 2], "orders")
    result = tasks.app.AsyncResult(task_id)
    assert (result.name, result.args, result.kwargs) == ("t.add", [1, 2], {"fast": True})


def test_broker_and_backend_on_one_database_share_one_pool(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks("pgqueue")
    with tasks.app.connection_for_write() as connection:
        transport_store = connection.transport.store
    assert tasks.app.backend.store.pool is transport_store.pool


def test_the_backends_own_options_hold_on_a_pool_the_transport_opened(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks("pgqueue", backend_options={"prune_batch_size": 50})
    with tasks.app.connection_for_write() as connection:
        transport_store = connection.transport.store  # the transport makes the pool first
    assert tasks.app.backend.store.options.prune_batch_size == 50
    assert transport_store.options.prune_batch_size != 50


def test_configuration_is_the_transports(backend_tasks: Callable[..., Tasks]) -> None:
    tasks = backend_tasks()
    tasks.app.conf.result_backend = tasks.app.conf.result_backend.replace(
        "pgqueue://postgres", "pgqueue://postgres:s3cret"
    )
    backend = PgQueueBackend(app=tasks.app, url=tasks.app.conf.result_backend)
    assert "s3cret" not in backend.as_uri()
    assert "s3cret" in backend.as_uri(include_password=True)
    assert pickle.loads(pickle.dumps(backend)).url == backend.url

    tasks.app.conf.result_backend_transport_options = {"polling_intervall": 2}
    with pytest.raises(ConfigurationError, match="did you mean 'polling_interval'"):
        PgQueueBackend(app=tasks.app, url=tasks.app.conf.result_backend)
