"""Fixtures for tests that run ``celery`` as real subprocesses against a fresh database.

Every worker a test starts is killed at teardown (warm shutdown, then SIGKILL of its
process group), whatever the test's outcome. Numbers a test measures (recovery times,
throughput) are printed in pytest's terminal summary under "transport_process
measurements", so a plain ``pytest -q`` run shows them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .procs import Database, Workers, pgqueue_url

_MEASUREMENTS: list[str] = []


@pytest.fixture
def broker_url(database_url: str) -> str:
    return pgqueue_url(database_url)


@pytest.fixture
def db(database_url: str) -> Database:
    return Database(database_url)


@pytest.fixture
def workers() -> Iterator[Workers]:
    started = Workers()
    try:
        yield started
    finally:
        started.reap_all()


@pytest.fixture
def measure(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """``measure("text")`` keeps a line for the terminal summary, named by the test."""

    def add(text: str) -> None:
        _MEASUREMENTS.append(f"{request.node.name}: {text}")

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if _MEASUREMENTS:
        terminalreporter.section("transport_process measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)
