"""A worker whose broker and backend disagree on the shared pool stops at start, saying why."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import wait_until

from .procs import Workers, pgqueue_url, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]


def test_a_worker_refuses_to_start_when_broker_and_backend_disagree_on_the_pool(
    tmp_path: Path, database_url: str, workers: Workers
) -> None:
    url = pgqueue_url(database_url)
    app = write_app(
        tmp_path,
        url,
        transport_options={"prepared_statements": False, "use_notify": False},
        result_backend=url,
        result_backend_transport_options={"use_notify": True},
    )
    worker = workers.start(app, "disagrees", pool="solo", wait=False)
    wait_until(lambda: not worker.alive(), timeout=60, message="the worker exits")
    assert worker.process.returncode != 0
    log = worker.log()
    assert "ConfigurationError: pgqueue option 'prepared_statements' is False in " in log
    assert "but True in result_backend_transport_options" in log
    assert " ready." not in log
