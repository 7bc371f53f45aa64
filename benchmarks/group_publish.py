"""Publishing a group: pgqueue's one-INSERT batches against one message at a time.

    python benchmarks/group_publish.py                 # N = 10,000, 3 rounds
    python benchmarks/group_publish.py --n 2000 --rounds 1

From one producer process, per round and interleaved: ``group(noop.s(i) for i in
range(N)).apply_async()`` and N ``noop.delay(i)`` calls, for pgqueue (scratch database
on ``--url``, dropped afterwards), pgqueue inside ``enqueue_in`` (one transaction),
and Redis at 127.0.0.1:6379 if it answers (Celery publishes a group there one LPUSH
per task). No worker runs: this is the publish side only. Tasks/s, median (min-max).
A measurement, not a test: it never fails, it reports.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa
from backend_results import scratch_database
from celery import Celery, group

from celery_pgqueue.transaction import enqueue_in


def redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_timeout=1).ping())
    except Exception:
        return False


def make_app(broker: str) -> tuple[Celery, Any]:
    app = Celery("group_bench", broker=broker, set_as_current=False)
    app.conf.task_ignore_result = True

    @app.task(name="group_bench.noop")
    def noop(i: int) -> None: ...

    app.connection_for_write().ensure_connection()
    return app, noop


def timed(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.n
    rates: dict[str, list[float]] = {}

    with scratch_database(args.url) as db_url:
        _pg_app, pg_noop = make_app("pgqueue://" + db_url.split("://", 1)[1])
        engine = sa.create_engine("postgresql+psycopg://" + db_url.split("://", 1)[1])
        cases: dict[str, Callable[[], object]] = {
            "pgqueue: group": lambda: group(pg_noop.s(i) for i in range(n)).apply_async(),
            "pgqueue: group in enqueue_in": lambda: in_transaction(engine, pg_noop, n),
            "pgqueue: N x delay()": lambda: [pg_noop.delay(i) for i in range(n)],
        }
        if redis_up():
            redis_app, redis_noop = make_app("redis://127.0.0.1:6379/15")
            cases["Redis: group"] = lambda: group(redis_noop.s(i) for i in range(n)).apply_async()
            cases["Redis: N x delay()"] = lambda: [redis_noop.delay(i) for i in range(n)]
        for round_no in range(args.rounds):
            for name, fn in cases.items():
                rates.setdefault(name, []).append(timed(fn, n))
                with psycopg.connect(db_url, autocommit=True) as conn:
                    conn.execute("TRUNCATE jobs CASCADE")
                if name.startswith("Redis"):
                    redis_app.connection_for_write().default_channel.client.flushdb()
            print(f"round {round_no + 1} done", flush=True)
        engine.dispose()

    redis_group = statistics.median(rates.get("Redis: group", [0.0])) or None
    print(f"\nGroup publish, N = {n:,}, {args.rounds} round(s); tasks/s median (min-max)\n")
    print("| case | tasks/s | x Redis group |")
    print("|---|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        ratio = f"{median / redis_group:.2f}x" if redis_group else "-"
        print(f"| {name} | {median:,.0f} ({min(values):,.0f}-{max(values):,.0f}) | {ratio} |")


def in_transaction(engine: sa.Engine, task: Any, n: int) -> None:
    with engine.begin() as conn, enqueue_in(conn):
        group(task.s(i) for i in range(n)).apply_async()


if __name__ == "__main__":
    main()
