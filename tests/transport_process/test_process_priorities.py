"""Priorities hold across a backlog with the settings the README shows (issue #14.11).

Celery takes up to ``worker_prefetch_multiplier`` times ``concurrency`` unacked messages
ahead of its pool, and runs what it holds first: a busy worker with the default
prefetch (4) runs the low-priority tasks it already took before urgent ones published
later. With ``worker_prefetch_multiplier = 1`` and ``task_acks_late = True`` it holds
only what it runs, so every later-published urgent task starts before every earlier
low-priority one still waiting. With early ack (Celery's default) a task is acked as
it starts, so each process holds one more in reserve: one low task comes first. With
the defaults, four do.

One worker process (``-c 1``) is kept busy by a task that waits for a file; six
low-priority tasks (9) are published, then three urgent ones (0); then the gate opens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from helpers import wait_until

from transport_process.procs import Database, Workers, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]

GATE_TASK = """

@app.task(name="proc.gate", shared=False, bind=True)
def gate(self, path):
    append(f"start {self.request.id} pid={os.getpid()} pgid={os.getpgrp()} label=gate")
    while not os.path.exists(path):
        time.sleep(0.02)
    return None
"""

LOW, URGENT = 6, 3


@pytest.mark.parametrize(
    ("conf", "low_first"),
    [
        ({"worker_prefetch_multiplier": 1, "task_acks_late": True}, 0),
        ({"worker_prefetch_multiplier": 1}, 1),
        ({}, 4),  # Celery's defaults: prefetch 4 per process, early ack
    ],
    ids=["prefetch-1-acks-late", "prefetch-1-early-ack", "default-prefetch-4"],
)
def test_a_busy_worker_runs_later_urgent_tasks_before_earlier_low_ones(
    tmp_path: Path,
    broker_url: str,
    db: Database,
    workers: Workers,
    measure,
    conf: dict[str, object],
    low_first: int,
) -> None:
    app = write_app(tmp_path, broker_url, transport_options={"polling_interval": 0.5}, **conf)
    with open(app.directory / f"{app.module}.py", "a") as fh:
        fh.write(GATE_TASK)
    gate_file = tmp_path / "open"
    workers.start(app, "w", concurrency=1)
    sender = Celery("sender", set_as_current=False)
    sender.conf.update(app.config)

    def send(specs: list[dict[str, Any]]) -> None:
        for spec in specs:
            sender.send_task(
                "proc.record", kwargs=spec["kwargs"], task_id=spec["id"], priority=spec["priority"]
            )

    try:
        sender.send_task("proc.gate", args=(str(gate_file),), task_id="gate")
        wait_until(lambda: app.record.events("gate"), timeout=30, message="the gate task started")
        send(task_specs(LOW, label="low", priority=9))
        # Whatever the worker takes ahead of its pool, it has taken before the urgent
        # tasks exist.
        held = 1 + low_first
        wait_until(
            lambda: db.task_counts().get("running", 0) == held,
            timeout=20,
            message=f"the worker holds {held} rows",
        )
        send(task_specs(URGENT, label="urgent", priority=0))
        gate_file.touch()
        db.wait_for_counts({"completed": 1 + LOW + URGENT}, timeout=60)
    finally:
        sender.close()

    order = [e.label for e in app.record.lines() if e.event == "run"]
    first_urgent = order.index("urgent")
    assert order.count("urgent") == URGENT and order.count("low") == LOW, order
    # Every urgent task started before every low one the worker had not already taken.
    assert order[first_urgent : first_urgent + URGENT] == ["urgent"] * URGENT, order
    assert first_urgent == low_first, order
    measure(f"{conf or 'defaults'}: start order after the gate {' '.join(order)}")


def test_with_prefetch_1_a_process_freed_next_to_long_tasks_takes_the_next_task(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers
) -> None:
    """The recommended settings leave no process idle while others run long tasks.

    Four processes, each holding only what it runs: three are busy behind gates, and
    short tasks go through the fourth one after another (none waits for a gate to
    open, nor for a second process to come free so that two can be claimed at once).
    """
    conf = {"worker_prefetch_multiplier": 1, "task_acks_late": True}
    app = write_app(tmp_path, broker_url, transport_options={"polling_interval": 0.5}, **conf)
    with open(app.directory / f"{app.module}.py", "a") as fh:
        fh.write(GATE_TASK)
    gate_file = tmp_path / "open"
    workers.start(app, "w", concurrency=4)
    sender = Celery("sender", set_as_current=False)
    sender.conf.update(app.config)
    try:
        for n in range(3):
            sender.send_task("proc.gate", args=(str(gate_file),), task_id=f"gate-{n}")
        wait_until(
            lambda: len([e for e in app.record.lines() if e.label == "gate"]) == 3,
            timeout=30,
            message="three gate tasks started",
        )
        shorts = task_specs(5, sleep=0.2, label="short")
        for spec in shorts:
            sender.send_task("proc.record", kwargs=spec["kwargs"], task_id=spec["id"])
        wait_until(
            lambda: (
                len(app.record.events(shorts[-1]["id"], "done")) == 1
                and all(app.record.events(s["id"], "done") for s in shorts)
            ),
            timeout=30,
            message="every short task done while the gates are still closed",
        )
        assert db.task_counts() == {"running": 3, "completed": 5}
    finally:
        gate_file.touch()
        sender.close()
