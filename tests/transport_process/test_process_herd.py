"""Ten idle solo workers on one queue: a task wakes one claimer, not all ten.

Counted, not timed: the server's transactions (``xact_commit + xact_rollback`` of the
test's private database in ``pg_stat_database``) while the workers sit idle, and
while tasks arrive at a modest rate. Before the herd fix every NOTIFY made every
idle worker claim (about 13 transactions per task here) and an idle worker ran about
four transactions a second (a poll of each queue every second, a maintenance pass
in every worker); the bounds below sit well between those figures and what the fix
does (about 4 per task, under 1 per idle worker per second), so a loaded machine
does not make them flaky. Every task still runs exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from .procs import Database, Workers, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]

WORKERS = 10
TASKS = 50
RATE = 10.0  # tasks per second
IDLE_SECONDS = 10.0
# PostgreSQL reports a backend's counts when it commits, at most once a second; an
# idle one within ten seconds. Waiting that long after the last task counts them all.
STATS_TAIL = 11.0
MAX_IDLE_TX_PER_WORKER_S = 2.0
MAX_TX_PER_TASK = 8.0


def _xacts(url: str) -> int:
    """The database's transactions so far (this read is one more)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_idle_workers_do_not_all_claim_each_task(
    tmp_path: Path,
    broker_url: str,
    database_url: str,
    db: Database,
    workers: Workers,
    measure,  # type: ignore[no-untyped-def]
) -> None:
    app = write_app(tmp_path, broker_url)
    started = [workers.start(app, f"herd{i}", pool="solo", wait=False) for i in range(WORKERS)]
    workers.wait_ready(started, timeout=90)
    time.sleep(STATS_TAIL)  # start-up's statements (declares, first polls) are counted

    x0, t0 = _xacts(database_url), time.monotonic()
    time.sleep(IDLE_SECONDS)
    x1, t1 = _xacts(database_url), time.monotonic()
    idle_rate = (x1 - x0 - 1) / (t1 - t0)

    specs = task_specs(TASKS, label="herd")
    began = time.monotonic()
    for i, spec in enumerate(specs):
        time.sleep(max(0.0, began + i / RATE - time.monotonic()))
        app.send([spec])
    app.close()
    polled = time.monotonic()
    db.wait_for_counts({"completed": TASKS}, timeout=60, workers=started)
    polls = (time.monotonic() - polled) / 0.25 + 1  # one read each, every 0.25 s
    time.sleep(STATS_TAIL)
    x2, t2 = _xacts(database_url), time.monotonic()
    # The tasks' share: less the idle background over the window and our own reads.
    per_task = (x2 - x1 - 1 - polls - idle_rate * (t2 - t1)) / TASKS

    runs = app.record.executions()
    assert [runs[s["id"]] for s in specs] == [1] * TASKS
    attempts = db.rows("SELECT job_id, count(*) FROM job_logs GROUP BY job_id")
    assert len(attempts) == TASKS and {n for _, n in attempts} == {1}
    summary = (
        f"{WORKERS} idle solo workers: {idle_rate / WORKERS:.2f} transactions per worker per "
        f"second idle, {per_task:.2f} per task at {RATE:g}/s"
    )
    measure(summary)
    assert idle_rate / WORKERS <= MAX_IDLE_TX_PER_WORKER_S, summary
    assert per_task <= MAX_TX_PER_TASK, summary
