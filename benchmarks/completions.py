"""Batched completions (#17.1, #17.3): drain rate, server transactions per task and peak
connections of one worker node, with ``batch_finishes`` off and on, interleaved.

    python benchmarks/completions.py                       # prefork -c 2, -c 8, threads -c 4
    python benchmarks/completions.py --configs prefork:8 --n 5000 --rounds 3
    python benchmarks/completions.py --python /path/to/other/venv/bin/python --modes default

Each run: a scratch database, ``--n`` no-op tasks (with results) published first, then a
real ``celery worker`` drains them. Reported per run: drain rate (n - 1 over the first
to the last completion, from the rows' own timestamps: the pool's start-up left out),
server transactions per task (``pg_stat_database.xact_commit`` from worker start to
the end, less the sampler's own: each hot statement is one autocommit transaction, so
this counts statements, start-up and idle polls included), and the most sessions of
the database seen at once during the drain (``pg_stat_activity``). ``--python`` runs the worker with
another interpreter (another checkout's venv: "before" numbers in the same hour).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from connections import APP, Sampler, pgqueue, spawn, stop
from pgbouncer_latency import scratch

PUBLISH = """\
import sys
from sizing_app import work
sigs = [work.s(0) for _ in range(int(sys.argv[1]))]
for s in sigs:
    s.delay()
print("done", flush=True)
"""


def xacts(conn: psycopg.Connection) -> int:  # type: ignore[type-arg]
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database"
        " WHERE datname = current_database()"
    ).fetchone()
    return int(row[0]) if row else 0


def one_run(args: argparse.Namespace, folder: Path, pool: str, conc: int, mode: str) -> dict:
    options: dict[str, object] = {}
    if mode in ("on", "off"):
        options["batch_finishes"] = mode == "on"
    python = args.python or sys.executable
    with scratch(args.url, "cpq_compl") as db_url:
        env = {**os.environ, "CPQ_URL": pgqueue(db_url), "PYTHONPATH": str(folder)}
        env["CPQ_OPTIONS"] = json.dumps(options)
        publisher = spawn(folder, env, "-c", PUBLISH, str(args.n))
        publisher.wait(300)
        with psycopg.connect(db_url, autocommit=True, application_name="bench-load") as conn:
            before = xacts(conn)
            polls = 0
            with Sampler(db_url) as sampler:
                sampler.phase = "load"
                worker = subprocess.Popen(
                    [
                        python,
                        "-m",
                        "celery",
                        "-A",
                        "sizing_app",
                        "worker",
                        "-P",
                        pool,
                        "-c",
                        str(conc),
                        "-l",
                        "warning",
                        "--without-mingle",
                        "--without-gossip",
                    ],
                    cwd=folder,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    start_new_session=True,
                )
                deadline = time.monotonic() + 300
                try:
                    while time.monotonic() < deadline:
                        polls += 1
                        row = conn.execute(
                            "SELECT count(*) FROM jobs WHERE status = 'completed'"
                        ).fetchone()
                        if row and row[0] >= args.n:
                            break
                        time.sleep(0.2)
                    sampler.phase = "after"
                    time.sleep(1.5)  # let the sessions report their statistics
                    after = xacts(conn)
                finally:
                    stop(worker)
            span = conn.execute(
                "SELECT extract(epoch FROM max(completed_at) - min(completed_at)), count(*)"
                " FROM jobs WHERE status = 'completed'"
            ).fetchone()
    assert span is not None
    seconds, done = float(span[0] or 0), int(span[1])
    own = polls + 1 + sampler.count  # this loop's queries, the closing read, the sampler's
    return {
        "rate": (done - 1) / seconds if seconds else 0.0,
        "xacts_per_task": (after - before - own) / max(done, 1),
        "peak": sampler.most.get("load", collections.Counter())["total"],
        "done": done,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", default="prefork:2,prefork:8,threads:4")
    parser.add_argument("--modes", default="off,on", help="batch_finishes values: off,on,default")
    parser.add_argument("--python", help="interpreter for the worker (another checkout)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cpq-compl-"))
    (folder / "sizing_app.py").write_text(APP)
    results: dict[str, list[dict]] = collections.defaultdict(list)
    try:
        for round_ in range(args.rounds):
            for config in args.configs.split(","):
                pool, conc = config.split(":")
                for mode in args.modes.split(","):
                    got = one_run(args, folder, pool, int(conc), mode)
                    key = f"{pool} -c {conc} batch_finishes={mode}"
                    results[key].append(got)
                    print(
                        f"round {round_ + 1} {key}: {got['rate']:.0f}/s,"
                        f" {got['xacts_per_task']:.2f} xacts/task, peak {got['peak']} sessions",
                        flush=True,
                    )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("\nmedians:")
    for key, runs in results.items():
        print(
            f"{key}: {statistics.median(r['rate'] for r in runs):.0f}/s,"
            f" {statistics.median(r['xacts_per_task'] for r in runs):.2f} xacts/task,"
            f" peak {max(r['peak'] for r in runs)} sessions"
        )


if __name__ == "__main__":
    main()
