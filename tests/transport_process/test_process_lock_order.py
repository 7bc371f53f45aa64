"""A prefork node with batched completions drains without a deadlock.

Three statements of one node update many ``jobs`` rows at once on connections of their
own: the early acks riding on a claim (main process), a batch of finishes (the
completion writer) and the lease renewal (the lease keeper). Each locked the rows in
its own join order, so two of them that shared rows could each wait for the other:
the server stalls both for ``deadlock_timeout`` (1 s) and rolls one back, and the
node's drain stalled with them (measured: prefork ``-c 8`` with ``batch_finishes`` ran
at half the rate of the option off, with the machine mostly idle). They now lock in id
order, so no two wait on each other.
"""

from __future__ import annotations

from pathlib import Path

from helpers import wait_until

from celery_pgqueue import api
from transport_process.procs import Database, Workers, task_specs, write_app

TASKS = 3000


DEADLOCKS = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
"""Read on a connection of its own each time (Database.value), so never a stale snapshot."""


def test_a_batched_drain_with_early_acks_and_lease_renewals_meets_no_deadlock(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, measure
) -> None:
    app = write_app(
        tmp_path,
        broker_url,
        # Renewals every 2 s, so they overlap the drain's acks and finishes too.
        transport_options={"lease_seconds": 6.0},
        result_backend=broker_url,
        result_backend_transport_options={"batch_finishes": True},
    )
    before = db.value(DEADLOCKS)
    api.pause(broker_url, "celery")
    app.publish(task_specs(TASKS, sleep=0, label="drain"))
    worker = workers.start(app, "node", concurrency=8)
    api.resume(broker_url, "celery")
    wait_until(
        lambda: db.value("SELECT count(*) FROM jobs WHERE status = 'completed'") >= TASKS,
        timeout=180,
        message="the drain",
    )
    worker.reap()  # its sessions end, and report their counters as they do
    deadlocks = db.value(DEADLOCKS) - before
    measure(f"prefork -c 8, batch_finishes on, {TASKS} tasks: {deadlocks} deadlocks")
    assert deadlocks == 0
