"""Fork safety: a child forked while a parent's thread holds one of our locks runs normally.

A prefork worker forks a child per task here (``worker_max_tasks_per_child = 1``)
while its own threads are busy: the lease keeper and the maintenance thread beat every
0.2 s, and a thread of the app keeps the process-wide locks of celery-pgqueue (the
store, lease-keeper and result-listener registries) held half of the time, as a busy
thread may at any instant. A lock is copied into the child in the state it had at the
fork, and the thread that would release it does not exist there: unless every such
lock is made anew in the child, a child's first task deadlocks on it (its outcome is
settled through the store registry) and the worker stops making progress.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .procs import Database, Workers, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow, pytest.mark.timeout(1800)]

# A few thousand forks; a fork and Celery's child set-up take 0.3-0.7 s on the 2-core
# test machine, so this runs for several minutes.
TASKS = 2_000

# Appended to the generated app module: runs in the worker's main process only.
LOCK_HOLDER = """

import threading

from celery import signals


def _hold_registry_locks():
    from celery_pgqueue.store import Store
    from celery_pgqueue.store.notify import ResultListener

    owners = [Store, ResultListener]
    try:
        from celery_pgqueue.leases import LeaseKeeper
    except ImportError:
        pass
    else:
        owners.append(LeaseKeeper)
    while True:
        for owner in owners:
            with owner._registry_lock:
                time.sleep(0.002)
            time.sleep(0.002)


@signals.worker_init.connect
def _start_lock_holder(**_):
    threading.Thread(target=_hold_registry_locks, name="lock-holder", daemon=True).start()
"""


def test_a_child_per_task_forked_while_locks_are_held_runs_every_task_once(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, measure
) -> None:
    app = write_app(
        tmp_path,
        broker_url,
        transport_options={"lease_seconds": 0.6, "maintenance_interval": 0.2},
        worker_max_tasks_per_child=1,
    )
    module = tmp_path / f"{app.module}.py"
    module.write_text(module.read_text() + LOCK_HOLDER)
    specs = task_specs(TASKS, label="fork")
    app.publish(specs)

    started = time.monotonic()
    worker = workers.start(app, "forking", pool="prefork", concurrency=4)
    db.wait_for_counts({"completed": TASKS}, timeout=1500, workers=[worker])
    elapsed = time.monotonic() - started

    runs = app.record.executions()
    assert set(runs) == {s["id"] for s in specs}
    assert {n for n in runs.values()} == {1}, "every task ran exactly once"
    pids = {e.pid for e in app.record.lines()}
    assert len(pids) >= TASKS // 2, f"a fresh child per task: {len(pids)} pids"
    measure(f"{TASKS} tasks, one forked child each, locks held in the parent: {elapsed:.0f} s")
