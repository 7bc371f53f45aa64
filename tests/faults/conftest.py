"""Fixtures for the fault tests: real ``celery worker`` processes, figures in the summary.

Every worker a test starts is killed at teardown, whatever the outcome. Figures a
test measures (re-runs, recovery times, throughput) are printed in pytest's terminal
summary under "fault measurements", so a plain ``pytest -q`` run shows them. Tests on
the suite's server get a fresh database each: ``broker_url`` and ``db`` name it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from transport_process.procs import Database, Workers, pgqueue_url

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
        print(f"{request.node.name}: {text}")

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if _MEASUREMENTS:
        terminalreporter.section("fault measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)
