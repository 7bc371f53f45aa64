"""``pgqueue set-limit QUEUE N|none`` through the real command line, and the Python API."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from celery_pgqueue import api
from celery_pgqueue.errors import ConfigurationError, UnknownQueue
from celery_pgqueue.store import Store

from .conftest import Jobs, Result

pytestmark = pytest.mark.slow


def _limit(sql: Any, queue: str) -> Any:
    return sql("SELECT concurrency_limit FROM job_queues WHERE name = %s", queue)[0][0]


def test_set_limit_stores_the_limit_and_status_shows_it(
    celery_cli: Callable[..., Result], jobs: Jobs, sql: Any
) -> None:
    jobs.queued("default")
    jobs.queued("emails")

    result = celery_cli("set-limit", "default", "5")

    assert result.code == 0, result
    assert "default" in result.out and "none -> 5" in result.out
    assert _limit(sql, "default") == 5
    queues = {q["name"]: q for q in json.loads(celery_cli("status", "--json").out)["queues"]}
    assert queues["default"]["concurrency_limit"] == 5
    assert queues["emails"]["concurrency_limit"] is None
    lines = celery_cli("status").out.splitlines()
    header = next(line for line in lines if line.startswith("QUEUE"))
    assert "LIMIT" in header
    row = next(line for line in lines if line.startswith("default "))
    assert row[header.index("LIMIT") : header.index("LIMIT") + len("LIMIT")].strip() == "5"


def test_set_limit_none_removes_the_limit(
    celery_cli: Callable[..., Result], jobs: Jobs, sql: Any
) -> None:
    jobs.queued("default")
    assert celery_cli("set-limit", "default", "2").code == 0

    result = celery_cli("set-limit", "default", "none")

    assert result.code == 0, result
    assert "2 -> none" in result.out
    assert _limit(sql, "default") is None


def test_set_limit_of_an_unknown_queue_exits_3_naming_the_queues(
    celery_cli: Callable[..., Result], jobs: Jobs, sql: Any
) -> None:
    jobs.queued("default")

    result = celery_cli("set-limit", "defualt", "2")

    assert result.code == 3, result
    assert "'defualt'" in result.err and "did you mean 'default'" in result.err
    assert _limit(sql, "default") is None


@pytest.mark.parametrize("value", ["-1", "two", "2.5", ""])
def test_set_limit_refuses_what_is_not_a_whole_number_or_none_with_exit_2(
    celery_cli: Callable[..., Result], jobs: Jobs, sql: Any, value: str
) -> None:
    jobs.queued("default")

    result = celery_cli("set-limit", "default", value)

    assert result.code == 2, result
    assert "none" in result.err  # the message says how to remove a limit
    assert _limit(sql, "default") is None


def test_python_api_sets_and_removes_a_limit(database_url: str, store: Store, sql: Any) -> None:
    store.ensure_queues(["reports"])

    api.set_limit(database_url, "reports", 3)
    assert _limit(sql, "reports") == 3
    assert api.limit(database_url, "reports") == 3

    api.set_limit(database_url, "reports", None)
    assert _limit(sql, "reports") is None
    with pytest.raises(UnknownQueue):
        api.set_limit(database_url, "nope", 1)
    with pytest.raises(ConfigurationError):
        api.set_limit(database_url, "reports", -2)
