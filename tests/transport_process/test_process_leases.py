"""Leases between real worker processes: ``kill -9`` rescue, and no rescue of live work.

A claimed job is ``running`` under a lease its worker renews from a background thread.
When the worker dies, the lease lapses and maintenance (in any other worker) takes the
job back: requeued if it was never acked (``acks_late``), failed if it was acked early,
because then the task may already have had its effects. A worker that is alive keeps
renewing, so however long a task runs, nobody else starts it.
"""

from __future__ import annotations

import statistics
import time
import uuid
from pathlib import Path

import pytest
from celery import Celery
from helpers import wait_until

from .procs import Database, Worker, Workers, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]

LEASE = 3.0
MAINTENANCE = 1.0
TASK_SECONDS = 4.0
# Beyond the lease and one maintenance pass: claim, NOTIFY, process start-up noise.
SLACK = 3.0


def _crash_app(tmp_path: Path, broker_url: str, *, acks_late: bool):  # type: ignore[no-untyped-def]
    return write_app(
        tmp_path,
        broker_url,
        transport_options={"lease_seconds": LEASE, "maintenance_interval": MAINTENANCE},
        task_acks_late=acks_late,
        worker_prefetch_multiplier=1,
    )


def _runner(pool: list[Worker], pgid: int) -> Worker:
    [worker] = [w for w in pool if w.pid == pgid]
    return worker


# Twenty trials in a row must lose nothing. A short lease and a short task keep a
# trial near two seconds; three workers mean two are ready while the replacement for
# the one just killed starts.
TRIALS = 20
TRIAL_LEASE = 2.0
TRIAL_MAINTENANCE = 0.25
TRIAL_TASK_SECONDS = 1.0


def test_kill_9_of_an_acks_late_worker_mid_task_lets_another_worker_finish_it(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, measure
) -> None:
    app = write_app(
        tmp_path,
        broker_url,
        transport_options={
            "lease_seconds": TRIAL_LEASE,
            "maintenance_interval": TRIAL_MAINTENANCE,
        },
        task_acks_late=True,
        worker_prefetch_multiplier=1,
    )
    pool = [workers.start(app, name, wait=False) for name in ("a", "b", "c")]
    recoveries: list[float] = []
    victims: dict[str, int] = {}
    try:
        for trial in range(TRIALS):
            wait_until(
                lambda: sum(w.ready() for w in pool) >= 2,
                timeout=45,
                message=f"trial {trial}: two workers ready",
            )
            [spec] = task_specs(1, sleep=TRIAL_TASK_SECONDS, label=f"trial{trial}")
            task_id = spec["id"]
            app.send([spec])
            [first] = wait_until(lambda t=task_id: app.record.events(t, "start"), timeout=30)
            victim = _runner(pool, first.pgid)

            killed_at = time.monotonic()
            victim.kill_group()
            assert victim.wait(10) is not None
            pool.remove(victim)
            victims[task_id] = victim.pid
            pool.append(workers.start(app, f"r{trial}", wait=False))

            starts = wait_until(
                lambda t=task_id: (
                    len(app.record.events(t, "start")) == 2 and app.record.events(t, "start")
                ),
                timeout=TRIAL_LEASE + TRIAL_MAINTENANCE + SLACK + 2,
                message=f"trial {trial}: a second worker starts the task",
            )
            recoveries.append(time.monotonic() - killed_at)
            assert starts[1].pgid != victim.pid
    finally:
        app.close()

    ids = list(victims)
    wait_until(
        lambda: all(db.status(t) == "completed" for t in ids),
        timeout=TRIAL_TASK_SECONDS + SLACK + 10,
        message="every trial's task completes",
    )
    for task_id, victim_pid in victims.items():
        starts = app.record.events(task_id, "start")
        assert [e.pgid == victim_pid for e in starts] == [True, False], task_id
        assert [e.pgid for e in app.record.events(task_id, "done")] == [starts[1].pgid]
        job = db.job(task_id)
        assert job is not None
        assert (job["status"], job["attempt_count"]) == ("completed", 2)
        assert [(n, s) for n, s, _ in db.logs(task_id)] == [(1, "retry"), (2, "success")]

    recoveries.sort()
    measure(
        f"kill -9 mid-task (acks_late, lease {TRIAL_LEASE:g} s, maintenance "
        f"{TRIAL_MAINTENANCE:g} s): {TRIALS} trials, 0 lost, 0 started twice while alive, "
        f"every task completed once on another worker; kill -> second start "
        f"min {recoveries[0]:.2f} / median {statistics.median(recoveries):.2f} / "
        f"max {recoveries[-1]:.2f} s"
    )


def test_kill_9_of_an_early_ack_worker_mid_task_fails_the_job_and_never_reruns_it(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, measure
) -> None:
    app = _crash_app(tmp_path, broker_url, acks_late=False)
    pool = [workers.start(app, "a", wait=False), workers.start(app, "b", wait=False)]
    settled: list[float] = []

    for trial in range(3):
        workers.wait_ready(pool)
        [spec] = task_specs(1, sleep=TASK_SECONDS, label=f"trial{trial}")
        task_id = spec["id"]
        app.publish([spec])
        [first] = wait_until(lambda t=task_id: app.record.events(t, "start"), timeout=30)
        # The early ack happens when the pool accepts the task; only after it does a
        # lost worker mean "may have run" rather than "never delivered".
        wait_until(lambda t=task_id: (db.job(t) or {}).get("acked_at"), timeout=10)
        victim = _runner(pool, first.pgid)

        killed_at = time.monotonic()
        victim.kill_group()
        assert victim.wait(10) is not None
        pool.remove(victim)

        wait_until(
            lambda t=task_id: db.status(t) == "failed",
            timeout=LEASE + MAINTENANCE + SLACK,
            message=f"trial {trial}: the job leaves 'running' as failed",
        )
        settled.append(time.monotonic() - killed_at)
        job = db.job(task_id)
        assert job is not None
        assert "worker lost" in (job["last_error_message"] or "").lower(), job
        assert job["attempt_count"] == 1
        assert [(n, s) for n, s, _ in db.logs(task_id)] == [(1, "failed")]

        # A task published after the failure runs on the survivor; the failed one
        # stays as it is, started once.
        [sentinel] = task_specs(1, label=f"sentinel{trial}")
        app.publish([sentinel])
        wait_until(lambda s=sentinel["id"]: db.status(s) == "completed", timeout=30)
        assert len(app.record.events(task_id, "start")) == 1
        assert db.status(task_id) == "failed"
        pool.append(workers.start(app, f"r{trial}", wait=False))

    measure(
        "kill -9 (early ack) -> job failed after " + ", ".join(f"{s:.2f}" for s in settled) + " s"
    )


@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks-late"])
def test_a_task_running_for_several_leases_is_never_started_twice(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, acks_late: bool, measure
) -> None:
    """Lease 2 s, tasks 8 s, two workers (solo and prefork) ready to steal.

    With early ack and prefetch 1 the prefork worker may also hold a second task
    reserved, unstarted, while the first runs: its lease must be renewed as well.
    """
    app = write_app(
        tmp_path,
        broker_url,
        transport_options={"lease_seconds": 2.0, "maintenance_interval": 0.5},
        task_acks_late=acks_late,
        worker_prefetch_multiplier=1,
    )
    pool = [
        workers.start(app, "solo", pool="solo", wait=False),
        workers.start(app, "prefork", pool="prefork", concurrency=1, wait=False),
    ]
    workers.wait_ready(pool)
    specs = task_specs(3, sleep=8.0, label="long")
    app.publish(specs)

    ids = [s["id"] for s in specs]
    wait_until(
        lambda: all(db.status(t) == "completed" for t in ids),
        timeout=45,
        message="three 8-second tasks complete",
    )

    for task_id in ids:
        assert [e.event for e in app.record.events(task_id)] == ["start", "done"], task_id
        job = db.job(task_id)
        assert job is not None
        assert job["attempt_count"] == 1, task_id
        assert [(n, s) for n, s, _ in db.logs(task_id)] == [(1, "success")]
    names = {w.pid: w.name for w in pool}
    ran_on = [names[app.record.events(t, "start")[0].pgid] for t in ids]
    measure(f"8 s tasks under a 2 s lease ran once each, on {ran_on}")


# A task that keeps one of the process's pooled connections busy, as a slow result
# write or a task using the same pool would. Appended to the generated app module.
HOLD_POOL_TASK = """

@app.task(name="proc.hold_pool", shared=False, bind=True)
def hold_pool(self, seconds, label=""):
    from celery_pgqueue.options import DatabaseURL, PgQueueOptions
    from celery_pgqueue.store import Store

    store = Store.for_url(
        DatabaseURL.parse(app.conf.broker_url),
        PgQueueOptions.parse(app.conf.broker_transport_options),
    )
    who = f"{self.request.id} pid={os.getpid()} pgid={os.getpgrp()} label={label}"
    append(f"start {who} at={time.time():.6f}")
    with store.engine.connect() as conn:
        conn.exec_driver_sql("SELECT pg_sleep(%(s)s)", {"s": seconds})
    append(f"done {who} at={time.time():.6f}")
"""


def test_an_exhausted_pool_does_not_let_a_running_tasks_lease_lapse(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, measure
) -> None:
    """A threads pool with more threads than pooled connections, every one busy.

    Worker "busy" runs three tasks that each hold a pooled connection for 6 s, on a
    pool of two: for 12 s its pool has no free connection most of the time. Its
    leases (2 s) must still be renewed, or worker "thief" (a pool of its own) rescues
    them (acks_late: requeued) and starts them a second time.
    """
    lease = {"lease_seconds": 2.0, "maintenance_interval": 0.5}
    busy_app = write_app(
        tmp_path,
        broker_url,
        name="busyapp",
        transport_options={**lease, "pool_size": 2, "max_overflow": 0, "pool_timeout": 60.0},
        task_acks_late=True,
        worker_prefetch_multiplier=1,
    )
    thief_app = write_app(
        tmp_path,
        broker_url,
        name="thiefapp",
        transport_options=lease,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
    )
    for app in (busy_app, thief_app):
        module = tmp_path / f"{app.module}.py"
        module.write_text(module.read_text() + HOLD_POOL_TASK)
    busy = workers.start(busy_app, "busy", pool="threads", concurrency=3)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    sender = Celery("sender", set_as_current=False)
    sender.conf.update(busy_app.config)
    try:
        for task_id in ids:
            sender.send_task("proc.hold_pool", args=(6.0,), task_id=task_id)
    finally:
        sender.close()

    def running_on_busy() -> list[str]:
        running = [t for t in ids if busy_app.record.events(t, "start")]
        return running if len(running) >= 2 else []

    held = wait_until(
        running_on_busy,
        timeout=30,
        message="two tasks hold the busy worker's two pooled connections",
    )
    thief = workers.start(thief_app, "thief", pool="solo")

    wait_until(
        lambda: all(db.status(t) == "completed" for t in ids),
        timeout=90,
        message="every task completes",
    )
    for task_id in ids:
        # The thief may claim a task the busy worker had not claimed yet; what must
        # never happen is a second start of one that is already running.
        starts = busy_app.record.events(task_id, "start") + thief_app.record.events(
            task_id, "start"
        )
        assert len(starts) == 1, f"{task_id} started on {[e.pgid for e in starts]}"
        job = db.job(task_id)
        assert job is not None
        assert job["attempt_count"] == 1, task_id
    assert all([e.pgid for e in busy_app.record.events(t, "start")] == [busy.pid] for t in held)
    assert thief.alive()
    measure("3 tasks holding a 2-connection pool 6 s each, lease 2 s: each ran once")
