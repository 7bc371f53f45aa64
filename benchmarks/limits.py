"""What does a global concurrency limit cost? A limited queue against an unlimited one.

    python benchmarks/limits.py                        # N = 2000 per run, 3 rounds
    python benchmarks/limits.py --n 500 --rounds 1

Per round, interleaved: a backlog of N no-op tasks on a queue of its own, then
``--workers`` ``celery worker`` processes (prefork ``-c 2``, early ack, no result
backend) drain it. The limited run first sets ``celery pgqueue set-limit QUEUE
--limit`` (default 100: above everything the fleet can hold, prefetched tasks
included, so the limit never binds and only its cost shows: the claim under the
queue's lock and the wake-up NOTIFY of every finish). Throughput is N over the time
from the first claim to the last completion, both on the database's clock
(``jobs.started_at``, ``jobs.completed_at``), so worker start-up is left out.

``--claims M`` adds a store-level measurement: M single-job claims, one after the
other, of an unlimited and of a limited queue: the claim's own latency. Run the script
once on this tree and once on another (``PYTHONPATH=<its source>``) to compare the
unlimited claim before and after a change.

A scratch database on ``--url`` is created and dropped. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from backend_results import scratch_database
from celery import Celery

from celery_pgqueue import api
from celery_pgqueue.store import NewJob, Store

APP = """\
import json

from celery import Celery

app = Celery("limits")
app.conf.update(json.loads({config!r}))


@app.task(name="limits.noop")
def noop():
    return None
"""


def config_for(broker_url: str, queue: str) -> dict[str, Any]:
    return {
        "broker_url": broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": queue,
        "worker_hijack_root_logger": False,
    }


def drain(db_url: str, n: int, workers: int, limit: int | None, workdir: Path) -> float:
    """Publish ``n`` tasks, start the workers, return tasks per second once all are done."""
    queue = f"limits-{'limited' if limit is not None else 'unlimited'}-{secrets.token_hex(3)}"
    broker_url = "pgqueue://" + db_url.split("://", 1)[1]
    config = config_for(broker_url, queue)
    sender = Celery(f"{queue}-sender", set_as_current=False)
    sender.conf.update(config)
    with sender.producer_or_acquire() as producer:
        for _ in range(n):
            sender.send_task("limits.noop", producer=producer)
    sender.close()
    if limit is not None:
        api.set_limit(db_url, queue, limit)

    module = queue.replace("-", "_")
    (workdir / f"{module}.py").write_text(APP.format(config=json.dumps(config)))
    env = {**os.environ, "PYTHONPATH": f"{workdir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = []
    for i in range(workers):
        log = open(workdir / f"{module}-{i}.log", "wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", module, "worker", "-n", f"w{i}@%h",
             "-P", "prefork", "-c", "2", "-l", "warning",
             "--without-heartbeat", "--without-gossip", "--without-mingle"],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        started.append(worker)
        log.close()
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'completed'),"
                    " extract(epoch FROM max(completed_at) - min(started_at))"
                    " FROM jobs WHERE queue_name = %s",
                    (queue,),
                ).fetchone()
                assert row is not None
                if row[0] >= n:
                    return n / float(row[1])
                time.sleep(0.2)
        raise RuntimeError(f"{queue}: not drained in 600 s")
    finally:
        for worker in started:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)


def claim_latency(db_url: str, claims: int, limit: int | None) -> float:
    """Median milliseconds of one single-job claim of a queue with ``claims`` jobs
    (``limit``: whether the queue has a limit; it is set to ``claims``)."""
    store = Store.for_url(db_url)
    queue = f"claims-{secrets.token_hex(3)}"
    store.enqueue([NewJob(id=uuid.uuid4(), queue_name=queue, payload={}) for _ in range(claims)])
    if limit is not None:
        store.set_queue_limit(queue, claims)  # claimed jobs stay running: never binds
    took = []
    for _ in range(claims):
        began = time.perf_counter()
        got = store.claim(queue, 1, "bench")
        took.append(time.perf_counter() - began)
        assert len(got) == 1
    return statistics.median(took) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--claims", type=int, default=0)
    args = parser.parse_args()
    modes: dict[str, int | None] = {"unlimited": None, f"limit {args.limit}": args.limit}
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    latencies: dict[str, list[float]] = {mode: [] for mode in modes}
    with scratch_database(args.url) as db_url, tempfile.TemporaryDirectory() as tmp:
        for round_no in range(args.rounds):
            order = list(modes.items())
            if round_no % 2:
                order.reverse()  # neither mode always runs on a warmer database
            for mode, limit in order:
                rate = drain(db_url, args.n, args.workers, limit, Path(tmp))
                rates[mode].append(rate)
                print(f"round {round_no + 1} {mode}: {rate:.0f} tasks/s", flush=True)
                if args.claims:
                    latencies[mode].append(claim_latency(db_url, args.claims, limit))

    print(
        f"\n{args.rounds} x {args.n} no-op tasks, {args.workers} prefork -c 2 workers, "
        "tasks/s from first claim to last completion (median, min-max)\n"
    )
    print("| queue | tasks/s | min | max | vs unlimited |" + (" claim ms |" if args.claims else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if args.claims else ""))
    base = statistics.median(rates["unlimited"])
    for mode, values in rates.items():
        median = statistics.median(values)
        claim = f" {statistics.median(latencies[mode]):.3f} |" if args.claims else ""
        print(
            f"| {mode} | {median:.0f} | {min(values):.0f} | {max(values):.0f} "
            f"| {median / base:.0%} |{claim}"
        )


if __name__ == "__main__":
    main()
