"""A prefork ``-c 8`` node holds at most 6 server connections, in the default options.

Its pool processes hand their finishes to the node's completion writer instead of each
keeping a connection for them (#17.1): ``batch_finishes`` is on by default for a pool
of 8 processes or more. Counted from ``pg_stat_activity`` every few milliseconds while
the node drains tasks with results: a count, not a timing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from transport_process.procs import Database, Workers, peak_sessions, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]

TASKS = 400
PEAK = 6


def test_a_prefork_c8_node_holds_at_most_6_connections_by_default(
    tmp_path: Path, broker_url: str, database_url: str, db: Database, workers: Workers, measure
) -> None:
    app = write_app(tmp_path, broker_url, result_backend=broker_url)
    worker = workers.start(app, "node", concurrency=8)
    with peak_sessions(database_url) as most:
        app.publish(task_specs(TASKS, sleep=0.005, label="count"))
        wait_until(
            lambda: db.value("SELECT count(*) FROM jobs WHERE status = 'completed'") >= TASKS,
            timeout=120,
            message="the drain",
        )
    assert worker.alive()
    measure(f"prefork -c 8, default options, {TASKS} tasks with results: peak {most[0]}")
    assert most[0] <= PEAK, f"{most[0]} server connections at peak: {most[1]}"


@pytest.mark.parametrize(
    ("concurrency", "setting", "writer"),
    [(4, None, False), (8, None, True), (8, False, False), (2, True, True)],
    ids=["c4-default", "c8-default", "c8-off", "c2-on"],
)
def test_batch_finishes_decides_whether_a_node_runs_a_completion_writer(
    tmp_path: Path,
    broker_url: str,
    workers: Workers,
    concurrency: int,
    setting: bool | None,
    writer: bool,
) -> None:
    """Unset, a pool of 8 processes or more batches its finishes (one writer, one
    connection for them), a smaller one does not; set, the option decides."""
    options: dict[str, Any] = {} if setting is None else {"batch_finishes": setting}
    app = write_app(
        tmp_path, broker_url, result_backend=broker_url, result_backend_transport_options=options
    )
    worker = workers.start(app, "node", concurrency=concurrency)
    # The writer starts before the first pool process forks, so before "ready".
    assert ("completion writer started" in worker.log()) is writer, worker.log()[-2000:]
