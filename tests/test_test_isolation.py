"""Tests must not leak Celery tasks into one another.

``@app.task`` is shared by default: Celery then adds the task to every app created
later in the process, and an app that defines its own task of the same name gets the
first one instead (``t.flaky`` of tests/transport ran in place of tests/backend's when
both ran in one session). Every task a test module defines is therefore ``shared=False``.

Nor may one stuck in-process worker stop the workers of every later test.
"""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from helpers import settle_worker_threads, wait_until
from transport_process.procs import pgqueue_url

TESTS = Path(__file__).resolve().parent


def _shared_task_decorators(path: Path) -> list[str]:
    """``file:line`` of each ``@<x>.task(...)`` in ``path`` that does not say ``shared=False``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for deco in node.decorator_list:
            call = deco if isinstance(deco, ast.Call) else None
            func = call.func if call else deco
            if not (isinstance(func, ast.Attribute) and func.attr == "task"):
                continue
            keywords = {k.arg: k.value for k in call.keywords} if call else {}
            shared = keywords.get("shared")
            if not (isinstance(shared, ast.Constant) and shared.value is False):
                found.append(f"{path.relative_to(TESTS)}:{deco.lineno}")
    return found


def test_every_task_defined_by_the_tests_is_not_shared() -> None:
    offenders = [
        hit for path in sorted(TESTS.rglob("*.py")) for hit in _shared_task_decorators(path)
    ]
    assert offenders == [], f"add shared=False to: {offenders}"


@pytest.mark.worker
def test_a_worker_outliving_its_test_leaves_later_workers_able_to_start(
    database_url: str,
) -> None:
    """``start_worker`` leaves Celery's global stop flag set when its thread outlives
    ``shutdown_timeout``; ``settle_worker_threads`` (run after every test) clears it."""
    app = Celery("isolation", set_as_current=False)
    app.conf.update(broker_url=pgqueue_url(database_url), worker_hijack_root_logger=False)
    started = threading.Event()
    ran: list[str] = []

    @app.task(name="isolation.slow", shared=False)
    def slow() -> None:
        started.set()
        time.sleep(3)

    @app.task(name="isolation.quick", shared=False)
    def quick() -> None:
        ran.append("quick")

    before = set(threading.enumerate())
    with (
        pytest.raises(RuntimeError, match="failed to exit"),
        start_worker(app, perform_ping_check=False, shutdown_timeout=0.5, loglevel="WARNING"),
    ):
        slow.delay()
        assert started.wait(15)
    assert settle_worker_threads(before, grace=30) == []

    with start_worker(app, perform_ping_check=False, loglevel="WARNING"):
        quick.delay()
        wait_until(lambda: ran == ["quick"], timeout=15)
    app.close()
