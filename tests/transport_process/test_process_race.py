"""Four worker processes racing for one queue: every task runs exactly once.

20,000 tasks are published before any worker starts, so all four begin claiming at
the same moment against a full queue: the situation ``FOR UPDATE SKIP LOCKED`` is for.
In the second run most tasks carry a priority, and a quarter, with a countdown of 1-3 s,
are published while the four workers drain the rest: claims race on rows that come
due while the others are being taken, and none may start before its due time by the
database's clock.

Commits are asynchronous here (``synchronous_commit=False``): the race is about
claims, and a WAL flush per publish would only make the run longer.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from .procs import Database, Workers, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]

TASKS = 20_000
WORKERS = 4
OPTIONS = {"synchronous_commit": False}
# The producer computes a countdown's eta just before its INSERT stamps created_at:
# the due time may precede created_at + countdown by that gap, never by more.
PUBLISH_GAP = timedelta(seconds=0.5)


def _exactly_once(app, specs, db: Database) -> None:  # type: ignore[no-untyped-def]
    runs = app.record.executions()
    expected = {s["id"] for s in specs}
    assert set(runs) == expected, (
        f"{len(expected - set(runs))} never ran, {len(set(runs) - expected)} unknown ran"
    )
    twice = {task_id: n for task_id, n in runs.items() if n != 1}
    assert twice == {}, f"{len(twice)} tasks ran more than once"
    assert db.rows("SELECT count(*) FROM jobs WHERE attempt_count <> 1") == [(0,)]
    assert db.rows("SELECT count(*) FROM job_logs WHERE status <> 'success'") == [(0,)]
    assert db.rows("SELECT count(*) FROM job_logs") == [(len(specs),)]


def test_four_workers_run_each_of_20000_tasks_exactly_once(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, measure
) -> None:
    app = write_app(tmp_path, broker_url, transport_options=OPTIONS)
    specs = task_specs(TASKS, label="race")
    published = app.publish(specs, processes=2)
    assert db.task_counts() == {"queued": TASKS}

    started = time.monotonic()
    pool = [workers.start(app, f"r{i}", wait=False) for i in range(WORKERS)]
    db.wait_for_counts({"completed": TASKS}, timeout=240, workers=pool)
    elapsed = time.monotonic() - started

    _exactly_once(app, specs, db)
    by_worker = Counter(e.pgid for e in app.record.lines())
    names = {w.pid: w.name for w in pool}
    share = ", ".join(f"{names[pgid]}={n}" for pgid, n in sorted(by_worker.items()))
    measure(
        f"{TASKS} tasks published in {published['seconds']:.1f} s "
        f"({TASKS / published['seconds']:.0f}/s), run by {WORKERS} prefork -c 1 workers in "
        f"{elapsed:.1f} s incl. start-up ({TASKS / elapsed:.0f}/s): {share}; "
        "0 lost, 0 run twice"
    )


def test_tasks_with_priorities_and_countdowns_published_to_busy_workers_run_once_and_never_early(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, measure
) -> None:
    app = write_app(tmp_path, broker_url, transport_options=OPTIONS)
    rng = random.Random(4)
    specs = task_specs(TASKS, label="mixed")
    for spec in specs:
        if rng.random() < 0.75:
            spec["priority"] = rng.randint(0, 9)
    later = specs[: TASKS // 4]
    for spec in later:
        spec["countdown"] = round(rng.uniform(1, 3), 3)
    countdowns = {s["id"]: s["countdown"] for s in later}
    backlog = app.publish(specs[TASKS // 4 :], processes=2)

    started = time.monotonic()
    pool = [workers.start(app, f"m{i}", wait=False) for i in range(WORKERS)]
    workers.wait_ready(pool)
    published = app.publish(later)
    while_busy = db.task_counts().get("queued", 0)
    db.wait_for_counts({"completed": TASKS}, timeout=240, workers=pool)
    elapsed = time.monotonic() - started

    _exactly_once(app, specs, db)
    # Due time: the database's clock at publish plus the countdown. job_logs.started_at
    # is the claim's now() (the same clock); the task's own clock reading comes later
    # (workers, producer and server share this machine's clock).
    rows = db.rows(
        "SELECT j.id::text, extract(epoch FROM j.created_at), extract(epoch FROM j.run_at),"
        " extract(epoch FROM l.started_at)"
        " FROM jobs j JOIN job_logs l ON l.job_id = j.id AND l.attempt_number = 1"
        " WHERE j.id = ANY(%s::uuid[])",
        list(countdowns),
    )
    assert len(rows) == len(countdowns)
    ran_at = {e.task_id: e.at for e in app.record.lines()}
    margins = []
    for task_id, created, run_at, claimed in rows:
        created, run_at, claimed = float(created), float(run_at), float(claimed)
        due = created + countdowns[task_id]
        assert run_at >= due - PUBLISH_GAP.total_seconds(), (task_id, run_at - due)
        assert claimed >= run_at, f"{task_id} claimed {run_at - claimed:.3f} s before run_at"
        assert ran_at[task_id] >= run_at, f"{task_id} ran {run_at - ran_at[task_id]:.3f} s early"
        margins.append(ran_at[task_id] - due)
    margins.sort()
    measure(
        f"{TASKS} tasks, priorities 0-9 on ~75%: {TASKS - len(countdowns)} published first "
        f"({backlog['seconds']:.1f} s), then {len(countdowns)} with countdown 1-3 s published "
        f"in {published['seconds']:.1f} s to {WORKERS} busy prefork -c 1 workers "
        f"({while_busy} still queued when that ended); all done {elapsed:.1f} s after the "
        f"workers started ({TASKS / elapsed:.0f}/s); 0 lost, 0 run twice; countdown tasks "
        f"started {margins[0]:+.3f} / {margins[len(margins) // 2]:+.3f} / {margins[-1]:+.3f} s "
        "(earliest / median / latest) from the database's clock at publish + countdown"
    )
