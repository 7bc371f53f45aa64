"""Four worker processes racing for one queue: every task runs exactly once.

5,000 tasks are published before any worker starts, so all four begin claiming at
the same moment against a full queue: the situation ``FOR UPDATE SKIP LOCKED`` is for.
The second run mixes in priorities and countdowns, so claims also race on rows that
become due while the workers are already busy.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest

from .procs import Database, Workers, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]

TASKS = 5_000
WORKERS = 4


@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "priorities-countdowns"])
def test_four_workers_run_each_of_5000_tasks_exactly_once(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, mixed: bool, measure
) -> None:
    app = write_app(tmp_path, broker_url)
    specs = task_specs(TASKS, label="race")
    if mixed:
        rng = random.Random(4)
        for spec in specs:
            kind = rng.random()
            if kind < 0.4:
                spec["priority"] = rng.randint(0, 9)
            elif kind < 0.7:
                spec["countdown"] = round(rng.uniform(0, 2), 3)
    published = app.publish(specs)
    assert db.task_counts() == {"queued": TASKS}

    started = time.monotonic()
    pool = [workers.start(app, f"r{i}", wait=False) for i in range(WORKERS)]
    db.wait_for_counts({"completed": TASKS}, timeout=240, workers=pool)
    elapsed = time.monotonic() - started

    runs = app.record.executions()
    expected = {s["id"] for s in specs}
    assert set(runs) == expected, (
        f"{len(expected - set(runs))} never ran, {len(set(runs) - expected)} unknown ran"
    )
    twice = {task_id: n for task_id, n in runs.items() if n != 1}
    assert twice == {}, f"{len(twice)} tasks ran more than once"
    assert db.rows("SELECT count(*) FROM jobs WHERE attempt_count <> 1") == [(0,)]
    assert db.rows("SELECT count(*) FROM job_logs WHERE status <> 'success'") == [(0,)]

    by_worker = Counter(e.pgid for e in app.record.lines())
    names = {w.pid: w.name for w in pool}
    share = ", ".join(f"{names[pgid]}={n}" for pgid, n in sorted(by_worker.items()))
    measure(
        f"{TASKS} tasks published in {published['seconds']:.1f} s, run by {WORKERS} prefork "
        f"-c 1 workers in {elapsed:.1f} s incl. start-up ({TASKS / elapsed:.0f}/s): {share}"
    )
