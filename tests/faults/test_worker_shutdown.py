"""Cold shutdown (SIGQUIT, or SIGQUIT during a warm shutdown) loses nothing.

Celery's cold shutdown cancels the tasks in progress (their pool processes are
terminated) and closes the connection. What happens to each row a worker held:

* prefetched, never started: back to ``queued`` as the worker exits (Kombu restores
  unacked deliveries at close), so another worker runs them at once, not after a lease;
* started with ``acks_late``: never acked, so restored the same way, and run again;
* started with early ack (Celery's default): acked, so it may have had effects. It is
  not run again; it stays ``running`` until its lease lapses and then ends ``failed``
  ("worker lost"), never stuck. With the pgqueue result backend Celery records these
  cancelled tasks as RETRY; that only records the state, and does not requeue them.

A second SIGTERM during a warm shutdown does nothing more (Celery ignores it), so
"double SIGTERM" is a warm shutdown: see ``test_process_shutdown.py``.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from helpers import wait_until
from transport_process.procs import Database, Workers, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]

LEASE = 3.0
MAINTENANCE = 0.5
CONCURRENCY = 2
PREFETCH = 5  # per process: the worker holds CONCURRENCY * PREFETCH = 10 rows
TASK_SECONDS = 2.5
SLACK = 5.0

SIGNALS = {
    "sigquit": [signal.SIGQUIT],
    "sigterm-then-sigquit": [signal.SIGTERM, signal.SIGQUIT],
}


def _held_by_first_worker(app, db: Database, workers: Workers, acks_late: bool, **conf):  # type: ignore[no-untyped-def]
    """Publish 10 four-second tasks; return the first worker once it runs two, holds ten."""
    specs = task_specs(CONCURRENCY * PREFETCH, sleep=TASK_SECONDS, label="held")
    app.publish(specs)
    first = workers.start(app, "first", concurrency=CONCURRENCY)
    wait_until(lambda: len(app.record.lines()) >= CONCURRENCY, timeout=30, message="two started")
    assert db.task_counts() == {"running": len(specs)}
    if not acks_late:
        # Early acks are written within a loop tick of the pool taking the task.
        wait_until(
            lambda: db.value("SELECT count(*) FROM jobs WHERE acked_at IS NOT NULL") == 2,
            timeout=10,
            message="the two started tasks acked",
        )
    return specs, first


def _cold_shutdown(first, signals: list[signal.Signals]) -> float:  # type: ignore[no-untyped-def]
    signalled = time.monotonic()
    for signum in signals:
        first.signal(signum)
        time.sleep(0.3)
    assert first.wait(30) is not None, "cold shutdown did not finish"
    return time.monotonic() - signalled


@pytest.mark.parametrize("signals", list(SIGNALS.values()), ids=list(SIGNALS))
@pytest.mark.parametrize("backend", [False, True], ids=["no-backend", "pgqueue-backend"])
def test_cold_shutdown_with_early_ack_requeues_the_unstarted_and_fails_the_cancelled(
    tmp_path: Path,
    broker_url: str,
    db: Database,
    workers: Workers,
    measure,
    signals: list[signal.Signals],
    backend: bool,
) -> None:
    app = write_app(
        tmp_path,
        broker_url,
        transport_options={"lease_seconds": LEASE, "maintenance_interval": MAINTENANCE},
        worker_prefetch_multiplier=PREFETCH,
        result_backend=broker_url if backend else None,
    )
    specs, first = _held_by_first_worker(app, db, workers, acks_late=False)
    started = {e.task_id for e in app.record.lines()}
    assert len(started) == CONCURRENCY

    exit_after = _cold_shutdown(first, signals)

    # At exit: the prefetched eight are back in line; the two cancelled ones, acked
    # early, are still running under a lease nobody renews.
    for spec in specs:
        job = db.job(spec["id"])
        assert job is not None
        if spec["id"] in started:
            assert job["status"] == "running" and job["acked_at"] is not None, job
            assert [e.event for e in app.record.events(spec["id"])] == ["start"]
        else:
            assert job["status"] == "queued", job
            assert [s for _, s, _ in db.logs(spec["id"])] == ["retry"]

    stopped_at = time.monotonic()
    second = workers.start(app, "second", concurrency=CONCURRENCY)
    db.wait_for_counts(
        {"completed": len(specs) - CONCURRENCY, "failed": CONCURRENCY},
        timeout=LEASE + MAINTENANCE + 2 * TASK_SECONDS + SLACK + 10,
        workers=[second],
    )
    settled = time.monotonic() - stopped_at
    runs = app.record.executions()
    for spec in specs:
        job = db.job(spec["id"])
        assert job is not None
        if spec["id"] in started:
            assert runs[spec["id"]] == 1, "an acked, cancelled task must not run again"
            assert "worker lost" in (job["last_error_message"] or "").lower(), job
            assert job["attempt_count"] == 1
        else:
            assert runs[spec["id"]] == 1
            assert [e.pgid for e in app.record.events(spec["id"])] == [second.pid, second.pid]
    measure(
        f"{'+'.join(s.name for s in signals)} (early ack, lease {LEASE:g} s, "
        f"{'pgqueue' if backend else 'no'} result backend) holding 10 rows, 2 running: exit "
        f"after {exit_after:.2f} s; 8 back to queued at exit and run once elsewhere, 2 "
        f"cancelled ones failed 'worker lost', run once; all settled {settled:.1f} s "
        "after exit"
    )


@pytest.mark.parametrize("signals", list(SIGNALS.values()), ids=list(SIGNALS))
def test_cold_shutdown_with_acks_late_requeues_everything_at_once(
    tmp_path: Path,
    broker_url: str,
    db: Database,
    workers: Workers,
    measure,
    signals: list[signal.Signals],
) -> None:
    """Nothing waits for a lease: the lease here is far longer than the whole test."""
    app = write_app(
        tmp_path,
        broker_url,
        transport_options={"lease_seconds": 300.0, "maintenance_interval": MAINTENANCE},
        worker_prefetch_multiplier=PREFETCH,
        task_acks_late=True,
    )
    specs, first = _held_by_first_worker(app, db, workers, acks_late=True)
    started = {e.task_id for e in app.record.lines()}

    exit_after = _cold_shutdown(first, signals)

    assert db.task_counts() == {"queued": len(specs)}, "every held row back in line at exit"
    stopped_at = time.monotonic()
    second = workers.start(app, "second", concurrency=CONCURRENCY)
    db.wait_for_counts(
        {"completed": len(specs)}, timeout=3 * TASK_SECONDS + SLACK + 10, workers=[second]
    )
    settled = time.monotonic() - stopped_at
    runs = app.record.executions()
    for spec in specs:
        done = app.record.events(spec["id"], "done")
        assert [e.pgid for e in done] == [second.pid], spec["id"]
        job = db.job(spec["id"])
        assert job is not None
        assert job["attempt_count"] == 2
        if spec["id"] in started:
            # Cancelled mid-run, then run in full elsewhere: at least once.
            assert runs[spec["id"]] == 2
        else:
            assert runs[spec["id"]] == 1
    measure(
        f"{'+'.join(s.name for s in signals)} (acks_late, lease 300 s) holding 10 rows, 2 "
        f"running: exit after {exit_after:.2f} s, all 10 back to queued at exit; the 2 "
        f"cancelled ran again in full, the 8 once; all done {settled:.1f} s after exit"
    )
