"""AsyncResult.get() woken by NOTIFY: one LISTEN connection per process, no polling.

Waits here are set up so a poll could not pass them: the backend's ``polling_interval``
is 30 s, so a get() that returns within a second was woken by its NOTIFY.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from celery import states
from celery.result import ResultSet
from helpers import wait_until

from celery_pgqueue.errors import DatabaseUnavailable

from .conftest import Tasks, rows, running_worker

pytestmark = pytest.mark.worker

NO_POLLING = {"polling_interval": 30.0}


def result_listeners(database_url: str) -> int:
    """LISTEN connections on the results channel, from any process."""
    [(count,)] = rows(
        database_url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND query LIKE 'LISTEN %%_results\"'",
    )
    return int(count)


def get_in_thread(result: Any, timeout: float = 30.0) -> dict[str, Any]:
    """Start ``result.get()`` in a thread; the dict fills in when it returns or raises."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = result.get(timeout=timeout)
        except BaseException as exc:
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    threading.Thread(target=run, daemon=True).start()
    return outcome


def test_a_waiting_get_is_woken_by_the_notify_not_a_poll(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks(backend_options=NO_POLLING)
    with running_worker(tasks.app):
        latencies = []
        for key in range(5):
            tasks.gate.clear()
            result = tasks.gated.delay(key)
            threading.Timer(0.1, tasks.gate.set).start()  # finishes while get() waits
            assert result.get(timeout=10) == key
            latencies.append(time.monotonic() - tasks.finished_at[key])
    assert max(latencies) < 1.0, f"woken late (a poll?): {latencies}"


def test_without_notify_waiting_clients_poll(backend_tasks: Callable[..., Tasks]) -> None:
    tasks = backend_tasks(backend_options={"use_notify": False, "polling_interval": 0.1})
    with running_worker(tasks.app):
        tasks.gate.clear()
        result = tasks.gated.delay("polled")
        threading.Timer(0.2, tasks.gate.set).start()
        assert result.get(timeout=10) == "polled"
        assert result_listeners(tasks.database_url) == 0


@pytest.mark.slow
def test_200_concurrent_gets_share_one_listen_connection(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks(backend_options=NO_POLLING)
    with running_worker(tasks.app, concurrency=8):
        tasks.gate.clear()
        results = [tasks.gated.delay(i) for i in range(200)]
        outcomes = [get_in_thread(r) for r in results]  # one thread per get()
        wait_until(lambda: result_listeners(tasks.database_url) == 1, timeout=10)
        tasks.gate.set()
        wait_until(lambda: all("at" in o for o in outcomes), timeout=60)
        assert result_listeners(tasks.database_url) == 1
    assert [o.get("value", o.get("error")) for o in outcomes] == list(range(200))


@pytest.mark.slow
def test_a_producer_waiting_on_1000_results_holds_one_listen_connection(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks(backend_options=NO_POLLING)
    ids = [str(uuid.uuid4()) for _ in range(1000)]
    outcome: dict[str, Any] = {}

    def join() -> None:
        # Celery's backends are per thread: build the set where it is joined.
        waiting = ResultSet([tasks.app.AsyncResult(i) for i in ids])
        outcome["values"] = waiting.join_native(timeout=60)

    joiner = threading.Thread(target=join, daemon=True)
    joiner.start()
    wait_until(lambda: result_listeners(tasks.database_url) == 1, timeout=10)
    backend = tasks.app.backend  # this thread's backend plays the workers
    for n, task_id in enumerate(ids):
        backend.store_result(task_id, n, states.SUCCESS)
    joiner.join(timeout=60)

    assert outcome["values"] == list(range(1000))
    assert result_listeners(tasks.database_url) == 1


def test_a_database_that_goes_away_raises_a_connection_error_instead_of_hanging(
    backend_tasks: Callable[..., Tasks], pg_server_url: str
) -> None:
    tasks = backend_tasks(backend_options=NO_POLLING)
    database = tasks.database_url.rsplit("/", 1)[1]
    result = tasks.app.AsyncResult(str(uuid.uuid4()))
    outcome = get_in_thread(result, timeout=60)
    wait_until(lambda: result_listeners(tasks.database_url) == 1, timeout=10)
    started = time.monotonic()
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )
            wait_until(lambda: "at" in outcome, timeout=15)
        finally:
            admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
    assert isinstance(outcome.get("error"), DatabaseUnavailable), outcome
    assert isinstance(outcome["error"], ConnectionError), "callers may catch ConnectionError"
    assert outcome["at"] - started < 15


def test_a_dropped_listen_connection_is_replaced_and_nothing_is_missed(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks(backend_options=NO_POLLING)
    with running_worker(tasks.app):
        tasks.gate.clear()
        result = tasks.gated.delay("after the drop")
        outcome = get_in_thread(result)
        wait_until(lambda: result_listeners(tasks.database_url) == 1, timeout=10)
        rows(
            tasks.database_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN %%_results\"'",
        )
        tasks.gate.set()  # may finish before the new LISTEN: the resync read finds it
        wait_until(lambda: "at" in outcome, timeout=8)
    assert outcome.get("value") == "after the drop"


def test_a_forked_child_listens_on_its_own_connection_and_spares_the_parents(
    backend_tasks: Callable[..., Tasks],
) -> None:
    tasks = backend_tasks(backend_options=NO_POLLING)
    backend = tasks.app.backend
    warm = str(uuid.uuid4())
    backend.store_result(warm, "warm", states.SUCCESS)
    assert tasks.app.AsyncResult(warm).get(timeout=5) == "warm"
    assert result_listeners(tasks.database_url) == 1
    for_child, for_parent = str(uuid.uuid4()), str(uuid.uuid4())

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait on a result the parent writes
        try:
            value: Any = tasks.app.AsyncResult(for_child).get(timeout=20)
        except BaseException as exc:
            value = repr(exc)
        os.write(write_end, json.dumps(value).encode())
        os._exit(0)
    os.close(write_end)
    try:
        wait_until(lambda: result_listeners(tasks.database_url) == 2, timeout=10)
        backend.store_result(for_child, "from the parent", states.SUCCESS)
        with os.fdopen(read_end) as pipe:
            assert json.loads(pipe.read()) == "from the parent"
    finally:
        os.waitpid(pid, 0)

    outcome = get_in_thread(tasks.app.AsyncResult(for_parent))
    backend.store_result(for_parent, "still listening", states.SUCCESS)
    wait_until(lambda: "at" in outcome, timeout=5)
    assert outcome.get("value") == "still listening"
    wait_until(lambda: result_listeners(tasks.database_url) == 1, timeout=5)
