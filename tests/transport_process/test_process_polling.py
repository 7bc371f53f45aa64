"""Without LISTEN/NOTIFY: polling mode, and PgBouncer in transaction pooling mode.

``use_notify=False`` and ``prepared_statements=False`` are the documented settings
behind PgBouncer's transaction pooling, where a server connection is handed to another
client after each transaction: a LISTEN cannot work there, and a statement prepared on
one session is missing (or collides: DuplicatePreparedStatement) on the next. Workers
then find work by polling alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import wait_until

from . import pgbouncer
from .procs import Database, Workers, task_specs, with_port, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]

POLLING = {"use_notify": False, "polling_interval": 0.5}
# What the README prescribes behind PgBouncer in transaction pooling mode (before 1.21).
BOUNCED = {**POLLING, "prepared_statements": False}


def _listeners(db: Database, database: str) -> int:
    return int(
        db.value(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = 'celery-pgqueue-listen'",
            database,
        )
    )


def test_polling_mode_worker_runs_tasks_and_opens_no_listen_connection(
    tmp_path: Path, broker_url: str, database_url: str, db: Database, workers: Workers
) -> None:
    app = write_app(tmp_path, broker_url, transport_options=POLLING)
    worker = workers.start(app, "poller")
    specs = task_specs(20, label="polled")
    app.publish(specs)

    db.wait_for_counts({"completed": 20}, timeout=30, workers=[worker])

    runs = app.record.executions()
    assert [runs[s["id"]] for s in specs] == [1] * 20
    assert _listeners(db, database_url.rsplit("/", 1)[1]) == 0


needs_pgbouncer = pytest.mark.skipif(
    pgbouncer.binary() is None,
    reason="pgbouncer is not installed (Debian: apt-get install pgbouncer); "
    "the transaction-pooling tests need /usr/sbin/pgbouncer",
)


@needs_pgbouncer
def test_worker_and_producer_through_pgbouncer_in_transaction_pooling_mode(
    tmp_path: Path, broker_url: str, database_url: str, db: Database, workers: Workers, measure
) -> None:
    with pgbouncer.running(database_url) as (port, log):
        pooled = with_port(broker_url, "127.0.0.1", port)
        app = write_app(tmp_path, pooled, transport_options=BOUNCED)
        worker = workers.start(app, "bounced")
        specs = task_specs(40, label="bounced")
        app.publish(specs[:20])
        app.publish(specs[20:])

        try:
            db.wait_for_counts({"completed": 40}, timeout=45, workers=[worker])
        finally:
            bouncer_log = log.read_text(errors="replace")
        runs = app.record.executions()
        assert [runs[s["id"]] for s in specs] == [1] * 40
        errors = [
            line for line in worker.log().splitlines() if "ERROR" in line or "WARNING" in line
        ]
        assert errors == [], "\n".join(errors[:20]) + "\n--- pgbouncer:\n" + bouncer_log[-2000:]
        measure(f"40 tasks through PgBouncer (transaction pooling, port {port}) completed")


@needs_pgbouncer
def test_kill_9_rescue_works_through_pgbouncer_and_leaves_no_lock_behind(
    tmp_path: Path, broker_url: str, database_url: str, db: Database, workers: Workers
) -> None:
    """Orphan rescue needs maintenance's lock to work through PgBouncer.

    Other clients share the PgBouncer, as an application's would: their statements
    keep it handing server connections around, so nothing depends on one client
    happening to get the same server session back. (A session advisory lock taken in
    autocommit leaked this way and stopped rescue in every worker, until d727924.)
    """
    with (
        pgbouncer.running(database_url) as (port, _log),
        pgbouncer.traffic(with_port(database_url, "127.0.0.1", port), clients=4),
    ):
        pooled = with_port(broker_url, "127.0.0.1", port)
        app = write_app(
            tmp_path,
            pooled,
            transport_options={**BOUNCED, "lease_seconds": 3.0, "maintenance_interval": 0.5},
            task_acks_late=True,
            worker_prefetch_multiplier=1,
        )
        pool = [workers.start(app, "a", wait=False), workers.start(app, "b", wait=False)]
        workers.wait_ready(pool)
        [spec] = task_specs(1, sleep=4.0, label="bounced-crash")
        app.publish([spec])
        [first] = wait_until(lambda: app.record.events(spec["id"], "start"), timeout=30)
        [victim] = [w for w in pool if w.pid == first.pgid]
        victim.kill_group()
        assert victim.wait(10) is not None

        wait_until(
            lambda: db.status(spec["id"]) == "completed",
            timeout=3.0 + 0.5 + 4.0 + 5.0,
            message="the survivor rescues and completes the task",
        )
        workers.reap_all()
        # Every worker is gone: a session lock still held is held by a PgBouncer
        # server connection, for nobody, and blocks maintenance everywhere.
        held = db.rows(
            "SELECT l.pid, a.application_name, a.state FROM pg_locks l"
            " JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND a.datname = %s",
            database_url.rsplit("/", 1)[1],
        )
        assert held == []
