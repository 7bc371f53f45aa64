"""The result backend's numbers: get() wake-up latency, concurrent waiters, chords, cleanup.

    python benchmarks/backend_results.py                      # local PostgreSQL, all brokers
    python benchmarks/backend_results.py --brokers pgqueue --samples 100

Creates a scratch database on the server of ``--url`` (dropped afterwards), runs an
in-process threaded worker per broker (pgqueue, and Kombu's memory broker as "another
broker"; redis when ``--brokers`` names it and one answers at 127.0.0.1:6379) and
prints a table. A measurement, not a test: it never fails, it reports.

latency   a client is already waiting in get() when the task returns; the time from the
          task's last line to get() returning (write, NOTIFY, wake-up, read). The same
          with ``use_notify`` off shows what polling costs.
200       200 threads each wait on one result; wall time from releasing the tasks to
          the last get() returning, and how many LISTEN connections served them.
chord     a 1,000-task chord, publish to body result.
cleanup   ``backend.cleanup()`` on 100,000 expired completed jobs with one log row each.
writes    ``store_result`` SUCCESS, 1,000 times in a row (a row the backend creates).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg
from celery import Celery, chord, states
from celery.contrib.testing.worker import start_worker
from psycopg import sql

from celery_pgqueue.migrate import upgrade
from celery_pgqueue.store import Store
from celery_pgqueue.store.notify import ResultListener


@contextmanager
def scratch_database(url: str) -> Iterator[str]:
    name = f"cpq_bench_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db_url = url.rsplit("/", 1)[0] + "/" + name
    try:
        upgrade(db_url)
        yield db_url
    finally:
        ResultListener.stop_all()
        for store in list(Store._registry.values()):
            store.dispose()
        Store._registry.clear()
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def make_app(db_url: str, broker: str, **backend_options: Any) -> tuple[Celery, dict[str, Any]]:
    pg = "pgqueue://" + db_url.split("://", 1)[1]
    broker_url, transport_options = {
        "pgqueue": (pg, {"polling_interval": 0.5}),
        "memory": ("memory://", {"polling_interval": 0.01}),
        "redis": (
            "redis://127.0.0.1:6379/0",
            {"global_keyprefix": f"cpq-bench-{secrets.token_hex(4)}:"},
        ),
    }[broker]
    app = Celery(f"bench-{secrets.token_hex(3)}", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options,
        result_backend=pg,
        result_backend_transport_options=backend_options,
        task_default_queue=f"q-{secrets.token_hex(3)}",
        worker_hijack_root_logger=False,
        result_expires=timedelta(hours=1),
    )
    state: dict[str, Any] = {"gate": threading.Event(), "done": {}}

    @app.task(name="b.gated", shared=False)
    def gated(key: int) -> int:
        state["gate"].wait(60)
        state["done"][key] = time.monotonic()
        return key

    @app.task(name="b.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="b.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    return app, state


def latency(app: Celery, state: dict[str, Any], samples: int) -> list[float]:
    gated = app.tasks["b.gated"]
    seen = []
    for key in range(samples):
        state["gate"].clear()
        result = gated.delay(key)
        threading.Timer(0.02, state["gate"].set).start()
        result.get(timeout=30)
        seen.append(time.monotonic() - state["done"][key])
    return seen


def concurrent(app: Celery, state: dict[str, Any], db_url: str, n: int = 200) -> tuple[float, int]:
    gated = app.tasks["b.gated"]
    state["gate"].clear()
    results = [gated.delay(1000 + i) for i in range(n)]
    finished: list[float] = []
    threads = [
        threading.Thread(target=lambda r=r: (r.get(timeout=120), finished.append(time.monotonic())))
        for r in results
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # let every thread reach its wait
    with psycopg.connect(db_url, autocommit=True) as conn:
        [(listeners,)] = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE 'LISTEN %%_results\"'"
        ).fetchall()
    started = time.monotonic()
    state["gate"].set()
    for thread in threads:
        thread.join()
    return max(finished) - started, int(listeners)


def chord_time(app: Celery, size: int = 1000) -> float:
    started = time.monotonic()
    result = chord([app.tasks["b.add"].s(i, 1) for i in range(size)], app.tasks["b.tsum"].s())()
    result.get(timeout=300)
    return time.monotonic() - started


def cleanup_time(app: Celery, db_url: str, n: int = 100_000) -> float:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO job_queues (name) VALUES ('old') ON CONFLICT DO NOTHING")
        conn.execute(
            "WITH made AS (INSERT INTO jobs (id, queue_name, status, priority, result,"
            " completed_at, updated_at) SELECT gen_random_uuid(), 'old', 'completed', 100,"
            ' \'{"status": "SUCCESS", "result": 1}\', now() - interval \'2 hours\','
            " now() - interval '2 hours' FROM generate_series(1, %s) RETURNING id)"
            " INSERT INTO job_logs (job_id, attempt_number, status, started_at, finished_at)"
            " SELECT id, 1, 'success', now() - interval '2 hours', now() - interval '2 hours'"
            " FROM made",
            (n,),
        )
        conn.execute("VACUUM ANALYZE jobs")
        conn.execute("VACUUM ANALYZE job_logs")
    started = time.monotonic()
    app.backend.cleanup()
    return time.monotonic() - started


def write_time(app: Celery, n: int = 1000) -> float:
    backend = app.backend
    ids = [str(uuid.uuid4()) for _ in range(n)]
    backend.store_result(ids[0], 0, states.SUCCESS)
    started = time.monotonic()
    for i, task_id in enumerate(ids[1:], 1):
        backend.store_result(task_id, i, states.SUCCESS)
    return (time.monotonic() - started) / (n - 1)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--brokers", default="pgqueue,memory")
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()

    table = ["| measurement | broker | result |", "|---|---|---|"]
    for broker in args.brokers.split(","):
        with scratch_database(args.url) as db_url:
            app, state = make_app(db_url, broker, polling_interval=30.0)
            with start_worker(
                app, pool="threads", concurrency=8, perform_ping_check=False, loglevel="WARNING"
            ):
                seen = sorted(latency(app, state, args.samples))
                p95 = seen[int(len(seen) * 0.95) - 1]
                table.append(
                    f"| get() after task returns (NOTIFY), n={len(seen)} | {broker} | "
                    f"p50 {ms(statistics.median(seen))}, p95 {ms(p95)}, max {ms(seen[-1])} |"
                )
                wall, listeners = concurrent(app, state, db_url)
                table.append(
                    f"| 200 concurrent get(), release to last return | {broker} | "
                    f"{ms(wall)}, {listeners} LISTEN connection(s) |"
                )
                table.append(
                    f"| 1,000-task chord, publish to body result | {broker} | "
                    f"{chord_time(app):.2f} s |"
                )
            app.close()
        with scratch_database(args.url) as db_url:
            app, state = make_app(db_url, broker, use_notify=False)  # default polling 1 s
            with start_worker(
                app, pool="threads", concurrency=8, perform_ping_check=False, loglevel="WARNING"
            ):
                seen = sorted(latency(app, state, min(args.samples, 10)))
                table.append(
                    f"| get() after task returns, use_notify off (poll 1 s), n={len(seen)} | "
                    f"{broker} | p50 {ms(statistics.median(seen))}, max {ms(seen[-1])} |"
                )
            app.close()
    with scratch_database(args.url) as db_url:
        app, _ = make_app(db_url, "memory")
        table.append(f"| store_result SUCCESS, backend-made row | - | {ms(write_time(app))} each |")
        cleanup = cleanup_time(app, db_url)
        table.append(f"| backend.cleanup(), 100,000 expired jobs + logs | - | {cleanup:.2f} s |")
        app.close()
    print("\n".join(table))


if __name__ == "__main__":
    main()
