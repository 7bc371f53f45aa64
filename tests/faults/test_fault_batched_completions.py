"""Batched completions lose nothing when the worker's main process is killed (#17.3).

With ``batch_finishes`` on, a prefork node's pool processes hand their finishes to the
completion writer its main process forked, which writes them in batches. ``kill -9``
of the main process alone (the pool processes and the writer outlive it for a moment)
at a random point of a drain, 20 times, half with ``acks_late``: every task must end
as the README's delivery guarantees say, never left ``running`` once its lease lapses
and rescue has run:

* ``completed`` with its SUCCESS result and its attempt's log row closed ``success``
  (a finish the writer committed, or one a pool process wrote itself once the writer
  or its parent was gone), and only for a task that ran;
* or taken back by lease rescue: ``queued`` again (``acks_late``, or an early ack not
  yet recorded) or ``failed`` "worker lost" (an early ack that was recorded).
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import psycopg
import pytest
from helpers import wait_until
from transport_process.procs import (
    App,
    Database,
    Worker,
    Workers,
    peak_sessions,
    task_specs,
    write_app,
)

from celery_pgqueue import api
from celery_pgqueue.store import Store

pytestmark = [pytest.mark.worker, pytest.mark.slow]

TRIALS = 10  # per ack mode: 20 in all
TASKS = 24
CONCURRENCY = 3


def _execute(db: Database, statement: str) -> None:
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(statement)  # type: ignore[arg-type]


def _settle(db: Database, broker_url: str) -> None:
    """Lapse every lease still held and run lease rescue, as a live worker would."""
    _execute(
        db,
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE status = 'running'",
    )
    store = Store.for_url(broker_url)
    try:
        store.rescue_expired()
    finally:
        Store.close_all()


def _check(
    db: Database, specs: list[dict[str, object]], ran: set[str], acks_late: bool
) -> dict[str, int]:
    seen: dict[str, int] = {}
    for spec in specs:
        job = db.job(str(spec["id"]))
        assert job is not None
        status = job["status"]
        seen[status] = seen.get(status, 0) + 1
        logs = db.logs(str(spec["id"]))
        if status == "completed":
            assert spec["id"] in ran, "recorded a success for a task that never ran"
            assert (job["result"] or {}).get("status") == "SUCCESS", job
            assert [s for _, s, _ in logs] == ["success"], logs
        elif status == "failed":
            assert not acks_late, "an acks_late task is run again, not failed"
            assert job["acked_at"] is not None, job
            assert "worker lost" in (job["last_error_message"] or "").lower(), job
        else:
            assert status == "queued", job  # taken back for another attempt
    return seen


@pytest.mark.parametrize("acks_late", [True, False], ids=["acks_late", "early_ack"])
def test_kill_9_of_the_main_process_loses_no_batched_finish(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, measure, acks_late: bool
) -> None:
    rng = random.Random(17)
    totals: dict[str, int] = {}
    for trial in range(TRIALS):
        directory = tmp_path / f"trial{trial}"
        directory.mkdir()
        app = write_app(
            directory,
            broker_url,
            transport_options={"lease_seconds": 30.0, "maintenance_interval": 60.0},
            result_backend=broker_url,
            result_backend_transport_options={"batch_finishes": True},
            task_acks_late=acks_late,
            worker_prefetch_multiplier=2,
        )
        _execute(db, "DELETE FROM job_logs")
        _execute(db, "DELETE FROM jobs")
        specs = task_specs(TASKS, sleep=0.01, label="batched")
        app.publish(specs)
        worker = workers.start(app, f"w{trial}", concurrency=CONCURRENCY)
        done_before = rng.randint(1, TASKS - CONCURRENCY)
        wait_until(
            lambda n=done_before: (
                db.value("SELECT count(*) FROM jobs WHERE status = 'completed'") >= n
            ),
            timeout=30,
            interval=0.005,
            message="tasks completing",
        )
        worker.signal(signal.SIGKILL)
        time.sleep(0.5)  # the pool processes and the writer notice and finish up
        worker.kill_group()
        worker.wait(10)
        _settle(db, broker_url)
        ran = {e.task_id for e in app.record.lines() if e.event == "start"}
        for status, n in _check(db, specs, ran, acks_late).items():
            totals[status] = totals.get(status, 0) + n
        assert db.value("SELECT count(*) FROM jobs WHERE status = 'running'") == 0
    measure(
        f"kill -9 of the main process mid-drain, batch_finishes on, "
        f"{'acks_late' if acks_late else 'early ack'}: {TRIALS} trials x {TASKS} tasks: "
        + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()))
    )


def _writer_pids(worker: Worker) -> list[int]:
    return [
        int(pid) for pid in re.findall(r"completion writer started \(pid (\d+)\)", worker.log())
    ]


def _node_with_writer(
    directory: Path, broker_url: str, workers: Workers, concurrency: int
) -> tuple[App, Worker]:
    """A prefork node with ``batch_finishes`` on, once its completion writer runs."""
    app = write_app(
        directory,
        broker_url,
        result_backend=broker_url,
        result_backend_transport_options={"batch_finishes": True},
    )
    worker = workers.start(app, "node", concurrency=concurrency)
    wait_until(lambda: _writer_pids(worker), timeout=10, message="the completion writer")
    return app, worker


def _completed(db: Database) -> int:
    return int(db.value("SELECT count(*) FROM jobs WHERE status = 'completed'"))


def test_a_killed_completion_writer_is_replaced_and_no_finish_is_lost(
    tmp_path: Path, broker_url: str, database_url: str, db: Database, workers: Workers, measure
) -> None:
    """``kill -9`` of the writer alone, mid-drain and then idle: the main process starts
    another on the same address, the pool processes go on handing their finishes to it
    (the node keeps one connection for them, not one per process), and every task ends
    completed, none left ``running``."""
    app, worker = _node_with_writer(tmp_path, broker_url, workers, concurrency=4)
    # Mid-drain: finishes in its hands are sent again to its successor.
    app.publish(task_specs(200, sleep=0.005, label="mid"))
    wait_until(lambda: _completed(db) >= 50, timeout=60, interval=0.005, message="a drain")
    os.kill(_writer_pids(worker)[-1], signal.SIGKILL)
    wait_until(lambda: _completed(db) >= 200, timeout=60, message="the rest of the drain")
    wait_until(lambda: len(_writer_pids(worker)) == 2, timeout=10, message="a new writer")
    # Idle: the next drain still goes through one writer.
    os.kill(_writer_pids(worker)[-1], signal.SIGKILL)
    wait_until(lambda: len(_writer_pids(worker)) == 3, timeout=10, message="a third writer")
    # Published to a paused queue, so the producer's own session is gone before
    # counting; the test's own sessions go by another name, not counted.
    ours = broker_url + ("&" if "?" in broker_url else "?") + "application_name=cpq-test"
    api.pause(ours, "celery")
    app.publish(task_specs(TASKS * 10, sleep=0.005, label="after"))
    with peak_sessions(database_url) as most:
        api.resume(ours, "celery")
        wait_until(lambda: _completed(db) >= 200 + TASKS * 10, timeout=120, message="a drain")
    assert worker.alive()
    assert db.value("SELECT count(*) FROM jobs WHERE status <> 'completed'") == 0
    assert "was killed by signal 9; starting another" in worker.log()
    measure(f"completion writer killed twice, prefork -c 4: peak {most[0]} sessions after")
    assert most[0] <= 6, f"pool processes write their own finishes: {most[1]}"


def test_a_sigterm_to_the_whole_node_leaves_its_writer_to_the_main_process(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers
) -> None:
    """``systemctl stop`` (KillMode=control-group) and ``pkill celery`` send SIGTERM to
    every process of the node at once. Celery's pool processes die of it (their tasks
    fail with WorkerLostError, as on any broker); the writer must not take it as its
    own stop: it records those ends until the main process stops it, with no
    "writer exited, starting another" for what is a clean stop."""
    app, worker = _node_with_writer(tmp_path, broker_url, workers, concurrency=2)
    app.publish(task_specs(2, sleep=1.5, label="long"))
    wait_until(
        lambda: db.value("SELECT count(*) FROM jobs WHERE status = 'running'") == 2,
        timeout=30,
        message="both tasks running",
    )
    os.killpg(worker.pid, signal.SIGTERM)
    assert worker.wait(60) == 0, worker.log()[-3000:]
    log = worker.log()
    assert "starting another" not in log, log[-3000:]
    assert len(_writer_pids(worker)) == 1
    ends = db.rows("SELECT status, last_error_message FROM jobs")
    assert [status for status, _ in ends] == ["failed", "failed"], ends
    assert all("WorkerLostError" in (error or "") for _, error in ends), ends
