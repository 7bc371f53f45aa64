"""A prefork ``-c 8`` node with batched completions holds at most 6 server connections.

Its pool processes hand their finishes to the node's completion writer instead of each
keeping a connection for them (#17.1). Counted from ``pg_stat_activity`` every few
milliseconds while the node drains tasks with results: a count, not a timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import wait_until

from transport_process.procs import Database, Workers, peak_sessions, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]

TASKS = 400
PEAK = 6


def test_a_prefork_c8_node_with_batched_completions_holds_at_most_6_connections(
    tmp_path: Path, broker_url: str, database_url: str, db: Database, workers: Workers, measure
) -> None:
    app = write_app(
        tmp_path,
        broker_url,
        result_backend=broker_url,
        result_backend_transport_options={"batch_finishes": True},
    )
    worker = workers.start(app, "node", concurrency=8)
    with peak_sessions(database_url) as most:
        app.publish(task_specs(TASKS, sleep=0.005, label="count"))
        wait_until(
            lambda: db.value("SELECT count(*) FROM jobs WHERE status = 'completed'") >= TASKS,
            timeout=120,
            message="the drain",
        )
    assert worker.alive()
    measure(f"prefork -c 8, batch_finishes on, {TASKS} tasks with results: peak {most[0]}")
    assert most[0] <= PEAK, f"{most[0]} server connections at peak: {most[1]}"
