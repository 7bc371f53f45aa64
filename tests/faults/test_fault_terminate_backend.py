"""``pg_terminate_backend`` of a worker's sessions (issue #9, fault 3).

An administrator (or a pooler, or an idle-session timeout) may end any session. A
worker must take that as a connection error and carry on: same process, a new LISTEN
session, and tasks published afterwards run. The worst case is a publish whose NOTIFY
went to the dead LISTEN session: the poll every ``polling_interval`` must still find
it, so the delay is bounded by that interval, not lost.

The worker runs with Celery's default early ack: a settle that failed on a pooled
connection the server had closed would then show as a task "failed: worker lost"
after the lease ran out, not only as a delay. Sessions are told apart by
``application_name``, which the worker's URL sets.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import wait_until
from transport_process.procs import Database, Workers, pgqueue_url, write_app

from .server import OnDemandProducer, add_timed_task, private_server, start_latencies

pytestmark = [pytest.mark.worker, pytest.mark.slow]

POLL = 1.0
LEASE = 3.0
TRIALS = 5
# Publish -> start after a kill: at most one poll interval, plus Celery's consumer
# restart and noise from the other processes on this 2-core machine.
BOUND = POLL + 4.0
NAME = "fault-worker"
RESTART_SPACING = 1.2


@pytest.mark.parametrize("backend", [False, True], ids=["no-backend", "pgqueue-backend"])
def test_terminated_sessions_are_replaced_and_a_lost_wakeup_costs_at_most_a_poll(
    tmp_path: Path, workers: Workers, measure, backend: bool
) -> None:
    with private_server() as pg:
        producers: list[OnDemandProducer] = []
        try:
            _terminate_and_publish(tmp_path, pg, workers, producers, measure, backend)
        finally:
            workers.reap_all()
            for producer in producers:
                producer.close()


def _terminate_and_publish(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    pg,
    workers: Workers,
    producers: list[OnDemandProducer],
    measure,
    backend: bool,
) -> None:
    db = Database(pg.url)
    options = {"polling_interval": POLL, "lease_seconds": LEASE, "maintenance_interval": 1.0}
    worker_dir = tmp_path / "worker"
    producer_dir = tmp_path / "producer"
    worker_dir.mkdir()
    producer_dir.mkdir()
    worker_url = pgqueue_url(pg.url) + f"?application_name={NAME}"
    app = write_app(
        worker_dir,
        worker_url,
        name="workerapp",
        transport_options=options,
        result_backend=worker_url if backend else None,
        result_backend_transport_options=options,
    )
    add_timed_task(app)
    sender = write_app(producer_dir, pgqueue_url(pg.url), name="senderapp")
    add_timed_task(sender)
    worker = workers.start(app, "w", concurrency=2)
    producer = OnDemandProducer(sender)
    producers.append(producer)

    def listen_pids() -> set[int]:
        return {
            int(pid)
            for (pid,) in db.rows(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = %s AND query LIKE 'LISTEN%%'",
                f"{NAME}-listen",
            )
        }

    def worker_pids() -> set[int]:
        return {
            int(pid)
            for (pid,) in db.rows(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE %s",
                f"{NAME}%",
            )
        }

    def terminate(pids: set[int]) -> None:
        db.rows("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", list(pids))

    def run_and_time(count: int = 1, sleep: float = 0.0) -> list[float]:
        ids = producer.publish(count, sleep=sleep)
        found = wait_until(
            lambda: (lat := start_latencies(app.record)) and all(i in lat for i in ids) and lat,
            timeout=30,
            interval=0.02,
            message=f"{ids} started",
        )
        return [found[i] for i in ids]

    baseline = run_and_time(5)
    wait_until(lambda: len(listen_pids()) == 1, timeout=10, message="one LISTEN session")

    # 1. Only the LISTEN session, then publish at once: the NOTIFY may go nowhere.
    listen_gaps: list[float] = []
    relisten: list[float] = []
    for _ in range(TRIALS):
        # Celery sleeps a second after five consumer restarts within one: space them.
        time.sleep(RESTART_SPACING)
        [old] = listen_pids()
        killed = time.monotonic()
        terminate({old})
        listen_gaps += run_and_time()
        new = wait_until(lambda o=old: (p := listen_pids()) and o not in p and p, timeout=15)
        relisten.append(time.monotonic() - killed)
        assert len(new) == 1, f"LISTEN sessions after the kill: {new}"
        assert worker.alive()

    # 2. Every session of the worker (LISTEN, the main process's pool, the pool
    #    children's), idle, then publish at once.
    children = {e.pid for e in app.record.lines()}
    assert len(children) == 2, f"both pool children have run a task: {children}"
    time.sleep(RESTART_SPACING)
    sessions = worker_pids()
    assert len(sessions) >= 4, f"expected LISTEN, pool and children sessions: {sessions}"
    terminate(sessions)
    all_gaps = run_and_time()
    wait_until(lambda: listen_pids() and not (listen_pids() & sessions), timeout=15)

    # 3. Every session again while both children run a task: each settles its row on
    #    a pooled connection the server has closed.
    wait_until(lambda: worker_pids() - sessions, timeout=15)
    time.sleep(RESTART_SPACING)
    in_flight = producer.publish(2, sleep=1.5)
    wait_until(lambda: all(i in start_latencies(app.record) for i in in_flight), timeout=15)
    terminate(worker_pids())

    # Same worker process; every task ran once and its row is completed (none lost,
    # none failed as "worker lost" because a settle hit a dead session).
    assert worker.alive() and "Connection to broker lost" in worker.log()
    published = 5 + TRIALS + 1 + 2
    db.wait_for_counts({"completed": published}, timeout=20, workers=[worker])
    executions = app.record.executions()
    assert len(executions) == published and max(executions.values()) == 1, executions
    assert {e.pid for e in app.record.lines()} == children, "a pool child was replaced"
    worst = max(listen_gaps + all_gaps)
    # One consumer restart per kill: after the LISTEN session drops, the pool's stale
    # sessions are dropped too instead of failing the reconnect once more (one race
    # with the poll timer allowed).
    restarts = worker.log().count("Connection to broker lost")
    assert restarts <= TRIALS + 2 + 1, f"{restarts} consumer restarts for {TRIALS + 2} kills"
    assert worst < BOUND, f"a wake-up was missed for {worst:.2f} s (poll {POLL} s)"

    measure(
        f"publish->start baseline max {max(baseline) * 1000:.0f} ms; after killing LISTEN"
        f" ({TRIALS} trials) {min(listen_gaps) * 1000:.0f}-{max(listen_gaps) * 1000:.0f} ms,"
        f" new LISTEN session {min(relisten):.2f}-{max(relisten):.2f} s after the kill;"
        f" after killing all {len(sessions)} idle worker sessions {all_gaps[0] * 1000:.0f} ms;"
        f" consumer restarts {restarts} for {TRIALS + 2} kills;"
        f" poll {POLL} s; lost 0, run twice 0, worker restarted 0"
    )
