"""Warm shutdown (SIGTERM) gives prefetched, unstarted tasks back at once.

A worker with concurrency 1 and prefetch multiplier 10 holds ten claimed rows while
it runs one. On SIGTERM it finishes what it started and must hand the rest back as
``queued`` before it exits: not leave them ``running`` until their lease lapses
(the lease here is 300 s, far longer than the test waits for anything).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from helpers import wait_until

from .procs import Database, Workers, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]


def test_sigterm_requeues_prefetched_tasks_at_once_and_another_worker_runs_them(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, measure
) -> None:
    app = write_app(
        tmp_path,
        broker_url,
        transport_options={"lease_seconds": 300.0, "maintenance_interval": 1.0},
        worker_prefetch_multiplier=10,
    )
    specs = task_specs(20, sleep=0.5, label="prefetched")
    ids = [s["id"] for s in specs]
    app.publish(specs)

    first = workers.start(app, "first", concurrency=1)
    wait_until(lambda: db.task_counts().get("running", 0) >= 10, timeout=30)
    wait_until(lambda: app.record.lines(), timeout=30)
    held = {
        task_id
        for (task_id,) in db.rows(
            "SELECT id::text FROM jobs WHERE status = 'running' AND payload->'headers' ? 'task'"
        )
    }

    signalled = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait(30) is not None, "warm shutdown did not finish"
    shutdown = time.monotonic() - signalled

    counts = db.task_counts()
    assert counts.get("running", 0) == 0, f"rows left running after warm shutdown: {counts}"
    requeued = []
    for task_id in sorted(held):
        status = db.status(task_id)
        events = [e.event for e in app.record.events(task_id)]
        if status == "completed":
            assert events == ["start", "done"], (task_id, events)
            continue
        assert status == "queued", (task_id, status)
        assert events == [], f"{task_id} started, yet was requeued"
        assert [s for _, s, _ in db.logs(task_id)] == ["retry"], db.logs(task_id)
        requeued.append(task_id)
    assert len(requeued) >= 9, f"of {len(held)} held, only {len(requeued)} came back"

    second = workers.start(app, "second", concurrency=1)
    ready = time.time()  # the clock the tasks record their start with
    db.wait_for_counts({"completed": 20}, timeout=60)
    rerun = min(e.at for t in requeued for e in app.record.events(t)) - ready
    runs = app.record.executions()
    assert {t: runs[t] for t in ids} == dict.fromkeys(ids, 1)
    assert all(e.pgid == second.pid for t in requeued for e in app.record.events(t))
    measure(
        f"SIGTERM while holding {len(held)} rows (lease 300 s): exit after {shutdown:.2f} s, "
        f"{len(held) - len(requeued)} finished, {len(requeued)} back to queued at exit; the "
        f"next worker started the first of them {rerun:+.2f} s from its 'ready'"
    )
