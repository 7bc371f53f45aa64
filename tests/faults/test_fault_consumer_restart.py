"""A consumer restart with the database up never runs a task a second time (issue #14.10).

Celery restarts a worker's consumer on any connection error (here every session of
the worker ended by ``pg_terminate_backend``, as an administrator, a pooler or
``idle_session_timeout`` would), while the pool keeps running what it was given:
the tasks in progress, and those already handed to the pool and waiting for a free
process. Kombu's channel close would put every unacked delivery back in the queue,
where another worker would start it while the first run goes on; and a lease keyed
on the old connection would lapse, so rescue would do the same a few seconds later.

Here one worker holds three 30-second tasks on two processes (two running, one
waiting for a free process), every session of it is terminated twice, and an idle
second worker stands by to run anything that comes back. The two running tasks must
stay with the first worker (claimed, leases renewed, one attempt) and end
``completed``; the waiting one, which Celery drops from memory at the restart (it
clears prefork's semaphore), goes back in line and runs once, wherever. Each task
starts exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import wait_until
from transport_process.procs import Database, Workers, pgqueue_url, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]

TASK_SECONDS = 30.0
LEASE = 3.0  # many leases pass while a task runs: each must be renewed across restarts
NAME = "restarted-worker"
# Celery waits a second after five consumer restarts within one: space the kills.
RESTART_SPACING = 1.2


@pytest.mark.parametrize("acks_late", [True, False], ids=["acks-late", "early-ack"])
def test_terminating_every_session_twice_mid_task_starts_each_task_once(
    tmp_path: Path, database_url: str, workers: Workers, measure, acks_late: bool
) -> None:
    db = Database(database_url)
    options = {"polling_interval": 0.5, "lease_seconds": LEASE, "maintenance_interval": 0.5}
    record = {"task_acks_late": acks_late, "worker_prefetch_multiplier": 4}
    first = write_app(
        tmp_path,
        pgqueue_url(database_url) + f"?application_name={NAME}",
        name="firstapp",
        transport_options=options,
        **record,
    )
    second = write_app(
        tmp_path, pgqueue_url(database_url), name="secondapp", transport_options=options, **record
    )

    w1 = workers.start(first, "w1", concurrency=2)
    specs = task_specs(3, sleep=TASK_SECONDS, label="long")
    first.send(specs)
    first.close()
    wait_until(
        lambda: len(first.record.lines()) == 2 and db.task_counts() == {"running": 3},
        timeout=30,
        message="two tasks started, the third claimed and waiting in w1's pool",
    )
    first_two = first.record.lines()
    w2 = workers.start(second, "w2", concurrency=2)

    def sessions() -> set[int]:
        return {
            int(pid)
            for (pid,) in db.rows(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE %s",
                f"{NAME}%",
            )
        }

    def listening() -> set[int]:
        return {
            int(pid)
            for (pid,) in db.rows(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = %s AND query LIKE 'LISTEN%%'",
                f"{NAME}-listen",
            )
        }

    for round_ in (1, 2):
        time.sleep(RESTART_SPACING)
        old = sessions()
        assert old, "w1 has sessions to terminate"
        db.rows("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", list(old))
        wait_until(
            lambda o=old: (p := listening()) and not (p & o),
            timeout=30,
            message=f"w1 listening on a new session after kill {round_}",
        )
        wait_until(
            lambda r=round_: w1.log().count("Connection to broker lost") >= r,
            timeout=30,
            message=f"consumer restart {round_} logged",
        )
        # Several leases pass with the rows held across the restart.
        time.sleep(3 * LEASE)
        assert db.task_counts() == {"running": 3}, (db.task_counts(), db.stuck())

    db.wait_for_counts({"completed": 3}, timeout=3 * TASK_SECONDS + 30, workers=[w1, w2])
    started = first.record.lines() + second.record.lines()
    starts = Counter(e.task_id for e in started if e.event == "start")
    assert starts == {spec["id"]: 1 for spec in specs}, started
    running = {e.task_id for e in first_two}
    assert not running & {e.task_id for e in second.record.lines()}, "w2 reran a running task"
    attempts = dict(
        db.rows("SELECT id::text, attempt_count FROM jobs WHERE id::text = ANY(%s)", list(running))
    )
    assert attempts == dict.fromkeys(running, 1), attempts
    assert w1.alive() and w2.alive()
    restarts = w1.log().count("Connection to broker lost")
    measure(
        f"acks_late={acks_late}: 3 tasks of {TASK_SECONDS:.0f} s, every w1 session"
        f" terminated twice (consumer restarts {restarts}); each started once, the two"
        f" running kept their attempt 1 and lease ({LEASE} s) across the restarts"
    )
