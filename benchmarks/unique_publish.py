"""Publishing with and without ``unique_key``: what a unique publish costs.

    python benchmarks/unique_publish.py                # N = 500, 5 rounds
    python benchmarks/unique_publish.py --n 200 --rounds 3 --plain-only

From one producer process, per round and interleaved, on a scratch database on
``--url`` (dropped afterwards): N ``noop.delay(i)`` (the plain path, unchanged by
unique tasks), N ``apply_async(unique_key=f"k{i}")`` (each key new: every publish
inserts), and N ``apply_async(unique_key="same")`` (after the first, every publish
finds the holder and writes nothing). ``--plain-only`` runs the first alone: run it
on a checkout without unique tasks to compare the plain path before and after. No
worker runs. Microseconds per publish, median (min-max) over rounds, of wall time
and of this process's CPU time (steadier on a shared machine: the client's share of
a publish). A measurement, not a test: it never fails, it reports.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import psycopg
from backend_results import scratch_database
from celery import Celery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--plain-only", action="store_true")
    args = parser.parse_args()
    n = args.n
    micros: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    with scratch_database(args.url) as db_url:
        app = Celery("unique_bench", broker="pgqueue://" + db_url.split("://", 1)[1])
        app.conf.task_ignore_result = True

        @app.task(name="unique_bench.noop")
        def noop(i: int) -> None: ...

        app.connection_for_write().ensure_connection()
        noop.delay(-1)  # warm: the pool's connection, the queue row, prepared statements
        cases: dict[str, Callable[[], object]] = {
            "delay() (no key)": lambda: [noop.delay(i) for i in range(n)],
        }
        if not args.plain_only:
            cases["unique_key, new key each"] = lambda: [
                noop.apply_async((i,), unique_key=f"k{i}") for i in range(n)
            ]
            cases["unique_key, duplicate"] = lambda: [
                noop.apply_async((i,), unique_key="same") for i in range(n)
            ]
        for _ in range(args.rounds):
            for name, fn in cases.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                micros.setdefault(name, []).append((time.perf_counter() - start) / n * 1e6)
                cpu.setdefault(name, []).append((time.process_time() - start_cpu) / n * 1e6)
                with psycopg.connect(db_url, autocommit=True) as conn:
                    conn.execute("TRUNCATE jobs, job_logs")
        app.close()

    print(f"N = {n} publishes per case, {args.rounds} rounds, µs per publish: wall | CPU")
    for name, values in micros.items():
        c = cpu[name]
        print(
            f"{name:26} {statistics.median(values):6.0f} ({min(values):.0f}-{max(values):.0f})"
            f" | {statistics.median(c):5.0f} ({min(c):.0f}-{max(c):.0f})"
        )


if __name__ == "__main__":
    main()
