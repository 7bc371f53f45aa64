"""``celery inspect`` tells the same story on pgqueue as on Redis (issue #14.4).

The same tasks run on a worker on each broker: one in progress, one reserved behind
it, one revoked. ``active()``, ``reserved()``, ``query_task()`` and ``revoked()`` must
return the same fields with the same values, ``delivery_info`` included: the exchange
and routing key the task was sent with, ``priority`` as the message carried it (0
when none was given, as Kombu stamps it, although the row got its queue's
``default_priority``) and ``redelivered``. Values that differ between any two workers
(hostname, pid, start time) are left out. ``scheduled()`` is empty on pgqueue by design:
countdown tasks wait in the database, not in a worker (``pgqueue jobs --scheduled``
lists them).

The Redis side needs the shared server on 127.0.0.1:6379; without it only that
comparison is skipped, and pgqueue's values are still checked against Redis's as
recorded here.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from helpers import running_worker, wait_until

pytestmark = pytest.mark.worker

REDIS_URL = "redis://127.0.0.1:6379/11"
# Differ between any two workers, or by design (acknowledged: see test docstring).
VOLATILE = {"hostname", "time_start", "worker_pid"}


def redis_reachable() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except Exception:
        return False


_release = threading.Event()


def _hold(self: Any, label: str, n: int = 0, *, extra: dict[str, Any] | None = None) -> str:
    """Stays in progress until the scene ends (one callable for every app: one task name)."""
    _release.wait(30)
    return label


@contextlib.contextmanager
def inspect_scene(app: Celery, *, priority: int | None) -> Iterator[dict[str, Any]]:
    """A worker holding one task in progress and one reserved; a third revoked.

    Yields what ``inspect`` answers, each worker's answer unwrapped.
    """
    from celery.worker import state as worker_state

    worker_state.revoked.clear()  # the test process's workers share it
    _release.clear()
    hold = app.task(name="t.hold", bind=True)(_hold)

    ids = {name: str(uuid.uuid4()) for name in ("active", "reserved", "revoked")}
    options: dict[str, Any] = {} if priority is None else {"priority": priority}
    hostname = f"inspect-{uuid.uuid4().hex[:8]}@test"
    with running_worker(app, pool="threads", concurrency=1, hostname=hostname):
        hold.apply_async(("first", 1), {"extra": {"k": [1, 2]}}, task_id=ids["active"], **options)
        hold.apply_async(("second",), task_id=ids["reserved"], **options)
        inspect = app.control.inspect(destination=[hostname], timeout=3.0)

        def ask(method: Callable[..., Any], *args: Any) -> Any:
            reply = wait_until(
                lambda: (r := method(*args)) and r.get(hostname) and r, timeout=30, interval=0.2
            )
            return reply[hostname]

        wait_until(lambda: (a := inspect.active()) and a.get(hostname), timeout=30, interval=0.2)
        wait_until(lambda: (r := inspect.reserved()) and r.get(hostname), timeout=30, interval=0.2)
        app.control.revoke(ids["revoked"], destination=[hostname])
        try:
            yield {
                "ids": ids,
                "active": ask(inspect.active),
                "reserved": ask(inspect.reserved),
                "query_task": ask(inspect.query_task, ids["active"], ids["reserved"]),
                "revoked": ask(inspect.revoked),
                "scheduled": (inspect.scheduled() or {}).get(hostname, []),
            }
        finally:
            _release.set()


def comparable(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer with values that differ between any two workers left out."""

    def info(item: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in item.items() if k not in VOLATILE}

    return {
        "active": [info(i) for i in answer["active"]],
        "reserved": [info(i) for i in answer["reserved"]],
        "query_task": {
            task_id: [state, info(i)] for task_id, (state, i) in answer["query_task"].items()
        },
        "revoked": sorted(answer["revoked"]),
    }


def expected_info(
    task_id: str, args: list[Any], kwargs: dict[str, Any], **delivery: Any
) -> dict[str, Any]:
    """What Redis answers for a task of the default queue (recorded from Celery 5.7)."""
    return {
        "id": task_id,
        "name": "t.hold",
        "args": args,
        "kwargs": kwargs,
        "type": "t.hold",
        "acknowledged": delivery.pop("acknowledged"),
        "delivery_info": {
            "exchange": "",
            "routing_key": "celery",
            "priority": 0,
            "redelivered": False,
            **delivery,
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize("priority", [None, 3], ids=["no-priority", "priority-3"])
def test_inspect_answers_match_redis_field_by_field(
    make_app: Callable[..., Celery], priority: int | None
) -> None:
    ids_pg: dict[str, str]
    with inspect_scene(make_app(), priority=priority) as answer:
        pgqueue = comparable(answer)
        ids_pg = answer["ids"]
        assert answer["scheduled"] == []

    wanted_priority = 0 if priority is None else priority
    assert pgqueue["active"] == [
        expected_info(
            ids_pg["active"],
            ["first", 1],
            {"extra": {"k": [1, 2]}},
            acknowledged=True,
            priority=wanted_priority,
        )
    ]
    assert pgqueue["reserved"] == [
        expected_info(
            ids_pg["reserved"], ["second"], {}, acknowledged=False, priority=wanted_priority
        )
    ]
    assert pgqueue["query_task"] == {
        ids_pg["active"]: ["active", pgqueue["active"][0]],
        ids_pg["reserved"]: ["reserved", pgqueue["reserved"][0]],
    }
    assert pgqueue["revoked"] == [ids_pg["revoked"]]

    if not redis_reachable():
        pytest.skip(f"Redis at {REDIS_URL} unreachable: pgqueue checked against recorded values")
    tag = uuid.uuid4().hex[:8]
    redis_app = make_app(
        broker_url=REDIS_URL,
        # Names of our own, so other users of the shared server see none of this.
        control_exchange=f"inspect-{tag}",
        task_default_queue="celery",
        broker_transport_options={"global_keyprefix": f"inspect-{tag}:"},
    )
    with inspect_scene(redis_app, priority=priority) as answer:
        on_redis = comparable(answer)
        ids_redis = answer["ids"]

    assert by_role(pgqueue, ids_pg) == by_role(on_redis, ids_redis)


def by_role(value: Any, ids: dict[str, str]) -> Any:
    """``value`` with each task id replaced by its role: the two runs have their own ids."""
    roles = {task_id: f"<{role}>" for role, task_id in ids.items()}
    if isinstance(value, dict):
        return {roles.get(k, k): by_role(v, ids) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [by_role(v, ids) for v in value]
    return roles.get(value, value) if isinstance(value, str) else value


def test_a_retried_task_without_priority_sees_0_and_keeps_its_queue_default(
    make_app: Callable[..., Celery], database_url: str
) -> None:
    """Celery's retry re-sends ``delivery_info['priority']``: 0 must not jump the queue."""
    import psycopg

    app = make_app()
    seen: list[Any] = []

    @app.task(name="t.retry_once", shared=False, bind=True, max_retries=1)
    def retry_once(self: Any) -> None:
        seen.append(self.request.delivery_info.get("priority"))
        if len(seen) == 1:
            raise self.retry(countdown=0)

    with running_worker(app):
        result = retry_once.delay()
        with psycopg.connect(database_url, autocommit=True) as conn:
            wait_until(
                lambda: (
                    conn.execute("SELECT status, attempt_count, priority FROM jobs").fetchall()
                    == [("completed", 2, 100)]
                ),
                timeout=20,
                message=f"{result.id} completed on attempt 2 with the queue's priority 100",
            )
    assert seen == [0, 0]
