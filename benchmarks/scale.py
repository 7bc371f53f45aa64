"""Many worker nodes on one queue: what the server does per task and per idle node.

    python benchmarks/scale.py                                  # 24 solo nodes, 10 tasks/s
    python benchmarks/scale.py --nodes 6 --pool prefork --concurrency 4 --rate 50
    python benchmarks/scale.py --src /path/to/other/checkout    # the workers run that code
    python benchmarks/scale.py --nodes 16 --countdown 2         # tasks come due 2 s later

Starts ``--nodes`` real ``celery -A harness.app worker`` processes (``harness/workers.py``:
own process group each, ``--without-heartbeat --without-gossip --without-mingle``,
remote control on) against a scratch database of their own (migrated, dropped at the
end), broker and result backend both ``pgqueue://``. Then:

1. **idle**: ``--idle-seconds`` with no tasks; the database's ``xact_commit +
   xact_rollback`` (``pg_stat_database``) over that window, per node per second;
2. **load**: tasks (``bench.noop``, which does nothing) published from this process at
   ``--rate`` for ``--seconds``, then a quiet tail long enough for every backend to
   report its statistics (PostgreSQL flushes them at most once a second, an idle
   backend within 10 s). Transactions per task = the window's transactions, less the
   idle rate over the tail (``gross``, publishes included) or over the whole window
   (``net``: what the tasks cost above the idle background).

Also printed: server sessions per node (``pg_stat_activity`` of the scratch database,
idle and the most seen under load, this script's own sessions left out), claims per
task when ``pg_stat_statements`` is loaded (else scans of the claim's index
``ix_jobs_ready`` per task, which also counts the schedule look-ups), throughput and
publish→start p50/p99 from the workers' records (with ``--countdown``: due→start, how
late after its countdown each task started). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from harness.stats import percentile
from harness.workers import Worker, kill_all_children
from pgbouncer_latency import scratch

# This script's sessions, left out of the session counts.
OWN_APP = "bench-scale"
QUEUE = "scale"
STATS_TAIL = 12.0  # seconds: idle backends report their statistics within 10 s


def xacts(conn: psycopg.Connection[Any], database: str) -> int:
    row = conn.execute(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
        (database,),
    ).fetchone()
    return int(row[0]) if row else 0


def claim_count(conn: psycopg.Connection[Any]) -> tuple[str, int] | None:
    """Claims so far (pg_stat_statements), else scans of the claim's index."""
    try:
        row = conn.execute(
            "SELECT sum(calls) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
            " WHERE d.datname = current_database() AND s.query LIKE '%%FOR UPDATE SKIP LOCKED%%'"
        ).fetchone()
        return "claims", int(row[0] or 0) if row else 0
    except psycopg.Error:
        pass
    row = conn.execute(
        "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'ix_jobs_ready'"
    ).fetchone()
    return ("ix_jobs_ready scans", int(row[0])) if row else None


def sessions(conn: psycopg.Connection[Any], database: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
        " AND application_name <> %s AND application_name <> ''",
        (database, OWN_APP),
    ).fetchone()
    return int(row[0]) if row else 0


class SessionSampler(threading.Thread):
    """The most server sessions seen at once while running."""

    def __init__(self, url: str, database: str) -> None:
        super().__init__(daemon=True)
        self.url, self.database = url, database
        self.most = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True, application_name=OWN_APP) as conn:
            while not self.stop.wait(0.2):
                self.most = max(self.most, sessions(conn, self.database))


def publish_paced(url: str, rate: float, seconds: float, countdown: float = 0.0) -> int:
    """Publish ``bench.noop(published_at)`` at ``rate`` per second; returns how many.
    With a ``countdown``, each task is due that many seconds later, and the time it
    carries is when it comes due."""
    from celery import Celery

    app = Celery("scale-producer", broker=url, set_as_current=False)
    total = max(1, round(rate * seconds))
    with app.producer_or_acquire() as producer:
        started = time.monotonic()
        for i in range(total):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            app.send_task(
                "bench.noop",
                args=(time.time() + countdown,),
                queue=QUEUE,
                producer=producer,
                countdown=countdown or None,
            )
    app.close()
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="cpq-scale-"))
    if args.src:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(args.src).resolve()), os.environ.get("PYTHONPATH")])
        )
    with scratch(args.url, "cpq_scale") as db_url:
        database = db_url.rsplit("/", 1)[1]
        broker = "pgqueue://" + db_url.split("://", 1)[1] + f"?application_name={OWN_APP}-w"
        producer_url = broker.rsplit("=", 1)[0] + "=" + OWN_APP
        config = {
            "broker_url": broker,
            "result_backend": broker if args.backend else None,
            "task_ignore_result": not args.backend,
            "task_default_queue": QUEUE,
            "worker_hijack_root_logger": False,
            "broker_connection_retry_on_startup": True,
        }
        config_file = workdir / "config.json"
        config_file.write_text(json.dumps(config))
        workers = [
            Worker(workdir, config_file, args.pool, args.concurrency, QUEUE, name=f"n{i}")
            for i in range(args.nodes)
        ]
        try:
            for worker in workers:
                worker.wait_ready(180)
            time.sleep(args.settle)
            with psycopg.connect(db_url, autocommit=True, application_name=OWN_APP) as conn:
                idle_sessions = sessions(conn, database)
                x0, t0 = xacts(conn, database), time.monotonic()
                time.sleep(args.idle_seconds)
                x1, t1 = xacts(conn, database), time.monotonic()
                # Our own reads are transactions too: one per xacts() call.
                idle_rate = (x1 - x0 - 1) / (t1 - t0)
                c0 = claim_count(conn)
                sampler = SessionSampler(db_url, database)
                sampler.start()
                load_began = time.monotonic()
                published = publish_paced(producer_url, args.rate, args.seconds, args.countdown)
                load_ended = time.monotonic()
                records = []
                deadline = time.monotonic() + 60 + args.countdown
                while time.monotonic() < deadline:
                    records = [line for w in workers for line in w.records()]
                    if len(records) >= published:
                        break
                    time.sleep(0.2)
                drained = time.monotonic()
                time.sleep(STATS_TAIL)
                sampler.stop.set()
                x2, t2 = xacts(conn, database), time.monotonic()
                c1 = claim_count(conn)
        finally:
            for worker in workers:
                worker.stop()
            kill_all_children()
    window = x2 - x1 - 3  # less our own reads in between
    tail = t2 - drained
    latencies = []
    for line in records:
        _, published_at, start, _ = line.split()
        if published_at != "-":
            latencies.append(float(start) - float(published_at))
    result: dict[str, Any] = {
        "nodes": args.nodes,
        "pool": f"{args.pool} -c {args.concurrency}",
        "rate": args.rate,
        "countdown": args.countdown,
        "tasks": published,
        "done": len(records),
        "sessions_per_node_idle": round(idle_sessions / args.nodes, 2),
        "sessions_per_node_load": round(sampler.most / args.nodes, 2),
        "idle_tx_per_node_s": round(idle_rate / args.nodes, 3),
        "tx_per_task_gross": round((window - idle_rate * tail) / published, 2),
        "tx_per_task_net": round((window - idle_rate * (t2 - t1)) / published, 2),
        "throughput_per_s": round(len(records) / max(1e-9, drained - load_began), 1),
        "publish_seconds": round(load_ended - load_began, 1),
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
    }
    if c0 and c1:
        result[f"{c1[0].replace(' ', '_')}_per_task"] = round((c1[1] - c0[1]) / published, 2)
    return result


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--nodes", type=int, default=24, help="worker processes (nodes)")
    parser.add_argument("--pool", default="solo")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rate", type=float, default=10.0, help="tasks per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument(
        "--settle", type=float, default=STATS_TAIL, help="seconds after start-up, before idle"
    )
    parser.add_argument(
        "--countdown",
        type=float,
        default=0.0,
        help="publish each task with this countdown (seconds): the herd at due times",
    )
    parser.add_argument("--no-backend", dest="backend", action="store_false")
    parser.add_argument("--src", help="run the workers on the celery_pgqueue in this checkout")
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)
    result = run(args)
    if args.label:
        result = {"label": args.label, **result}
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
