"""A global concurrency limit holds across a fleet of real workers (issue #18.2).

Three ``celery worker`` processes with four prefork children each (twelve processes
that could run at once) consume one queue limited to two with ``celery pgqueue
set-limit``. Forty tasks of one second each: the tasks' own start and end times show
never more than two of them running at once, and every one of them ran, once.

The limit is set while the workers already run and believe the queue unlimited: they
learn it from their next claim, not from a restart.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from transport_process import pgbouncer
from transport_process.procs import (
    Database,
    Execution,
    Workers,
    task_specs,
    with_port,
    write_app,
)

pytestmark = [pytest.mark.worker, pytest.mark.slow]

WORKERS, CONCURRENCY, LIMIT, TASKS, SECONDS = 3, 4, 2, 40, 1.0


def most_at_once(lines: list[Execution]) -> int:
    """The largest number of tasks between their start and done lines at one instant.

    A task that ends exactly when another starts is not counted twice: ends sort first.
    """
    edges = sorted(
        [(e.at, 0 if e.event == "done" else 1) for e in lines if e.at is not None],
    )
    running = most = 0
    for _, starts in edges:
        running += 1 if starts else -1
        most = max(most, running)
    return most


def test_three_workers_of_four_processes_never_run_more_than_the_limit(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, measure
) -> None:
    app = write_app(tmp_path, broker_url)
    pool = [
        workers.start(app, f"l{i}", concurrency=CONCURRENCY, wait=False) for i in range(WORKERS)
    ]
    workers.wait_ready(pool)

    limited = app.celery("pgqueue", "set-limit", "celery", str(LIMIT))
    assert limited.returncode == 0, limited.stderr
    assert "celery" in limited.stdout and str(LIMIT) in limited.stdout

    specs = task_specs(TASKS, sleep=SECONDS, label="limited")
    started = time.monotonic()
    app.publish(specs)
    db.wait_for_counts({"completed": TASKS}, timeout=180, workers=pool)
    elapsed = time.monotonic() - started

    lines = [e for e in app.record.lines() if e.event in ("start", "done")]
    runs = app.record.executions()
    assert set(runs) == {s["id"] for s in specs}
    assert set(runs.values()) == {1}, "a task ran twice"
    assert len([e for e in lines if e.event == "done"]) == TASKS
    assert most_at_once(lines) <= LIMIT
    shares = sorted(Counter(e.pgid for e in lines if e.event == "done").values())
    measure(
        f"{TASKS} tasks of {SECONDS:g} s, {WORKERS} workers x -c {CONCURRENCY}, limit {LIMIT}: "
        f"at most {most_at_once(lines)} at once, all done in {elapsed:.1f} s "
        f"(ideal {TASKS * SECONDS / LIMIT:.0f} s), "
        f"tasks per worker {shares}"
    )


# What the README prescribes behind PgBouncer in transaction pooling mode (before 1.21).
BOUNCED = {"use_notify": False, "polling_interval": 0.5, "prepared_statements": False}


@pytest.mark.skipif(
    pgbouncer.binary() is None,
    reason="pgbouncer is not installed (Debian: apt-get install pgbouncer)",
)
def test_the_limit_holds_through_pgbouncer_in_transaction_pooling(
    tmp_path: Path, broker_url: str, database_url: str, db: Database, workers: Workers
) -> None:
    """The claim's lock is a transaction's, so PgBouncer hands out server sessions as
    it likes (other clients keep it busy) and the limit still holds."""
    with (
        pgbouncer.running(database_url) as (port, _log),
        pgbouncer.traffic(with_port(database_url, "127.0.0.1", port), clients=4),
    ):
        app = write_app(
            tmp_path, with_port(broker_url, "127.0.0.1", port), transport_options=BOUNCED
        )
        pool = [workers.start(app, f"b{i}", concurrency=2, wait=False) for i in range(2)]
        workers.wait_ready(pool)
        assert app.celery("pgqueue", "set-limit", "celery", str(LIMIT)).returncode == 0
        specs = task_specs(12, sleep=SECONDS, label="bounced")
        app.publish(specs)
        db.wait_for_counts({"completed": 12}, timeout=120, workers=pool)

    lines = [e for e in app.record.lines() if e.event in ("start", "done")]
    assert set(app.record.executions().values()) == {1}
    assert len([e for e in lines if e.event == "done"]) == 12
    assert most_at_once(lines) <= LIMIT
