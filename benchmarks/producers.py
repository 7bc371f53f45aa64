"""Many producers, one table: aggregate publish rate with 1, 4, 16 producer processes, and
the claim rate with 8 against 64 concurrent claimers on one queue of 100,000 ready jobs.

    python benchmarks/producers.py                       # local PostgreSQL, 3 rounds
    python benchmarks/producers.py --url postgresql://postgres@127.0.0.1:5433/postgres
    python benchmarks/producers.py --producers 1,16 --seconds 3 --rounds 1 --no-claims

publish  N processes (forked, each its own Celery app on ``pgqueue://``, no worker)
         call ``noop.delay()`` in a loop for ``--seconds`` after a common start; the
         aggregate rate is every process's count over the window, with the machine's
         CPU busy share over it. Issue #17.5 asks for 16 producers >= 2x one.
         ``--client store`` publishes with ``Store.enqueue()`` instead (the same
         statement without Celery's own CPU per publish), which shows whether the
         server serialises the commits when the producers' CPU does not bind first.
claim    100,000 ready jobs in a fresh queue, then C processes each claim ``--claim-batch``
         jobs at a time (``Store.claim``, no Celery) for ``--seconds``; jobs claimed
         per second over all claimers. #17.5: 64 must not collapse against 8.

A scratch database on ``--url``'s server, dropped afterwards; measurements interleaved
round by round; median (min-max). A measurement, not a test: it never fails, it reports.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
import uuid
from multiprocessing.connection import Connection

import psycopg
from backend_results import scratch_database

FORK = mp.get_context("fork")


def _publisher(db_url: str, client: str, start_at: float, seconds: float, out: Connection) -> None:
    if client == "store":
        _store_publisher(db_url, start_at, seconds, out)
        return
    from celery import Celery

    app = Celery(f"producers-{os.getpid()}", set_as_current=False)
    app.conf.broker_url = "pgqueue://" + db_url.split("://", 1)[1]
    app.conf.task_ignore_result = True

    @app.task(name="producers.noop")
    def noop(i: int) -> None: ...

    for i in range(20):  # connect, learn the queue, prepare the statement
        noop.delay(i)
    time.sleep(max(0.0, start_at - time.time()))
    count, end = 0, start_at + seconds
    while time.time() < end:
        noop.delay(count)
        count += 1
    out.send(count)


def _store_publisher(db_url: str, start_at: float, seconds: float, out: Connection) -> None:
    """The transport's publish statement without Celery: ``Store.enqueue`` of one job."""
    from celery_pgqueue.store import NewJob, Store

    store = Store.for_url(db_url)

    def publish(i: int) -> None:
        store.enqueue([NewJob(id=uuid.uuid4(), queue_name="celery", payload={"i": i})])

    for i in range(20):
        publish(i)
    time.sleep(max(0.0, start_at - time.time()))
    count, end = 0, start_at + seconds
    while time.time() < end:
        publish(count)
        count += 1
    out.send(count)


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def publish_rate(db_url: str, processes: int, seconds: float, client: str) -> tuple[float, float]:
    """(tasks published per second, whole-machine CPU busy % over the window)."""
    start_at = time.time() + 1.0 + 0.15 * processes  # every process warmed up by then
    pipes, procs = [], []
    for _ in range(processes):
        ours, theirs = FORK.Pipe(duplex=False)
        proc = FORK.Process(target=_publisher, args=(db_url, client, start_at, seconds, theirs))
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    time.sleep(max(0.0, start_at - time.time()))
    busy0, total0 = cpu_times()
    total = sum(int(p.recv()) for p in pipes)
    busy1, total1 = cpu_times()
    busy = 100.0 * (busy1 - busy0) / max(1.0, total1 - total0)
    for proc in procs:
        proc.join()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs CASCADE")
    return total / seconds, busy


def _claimer(
    db_url: str, queue: str, batch: int, start_at: float, seconds: float, out: Connection
) -> None:
    from celery_pgqueue.store import Store

    store = Store.for_url(db_url)
    owner = f"bench-{os.getpid()}"
    store.claim(queue + "-warm", batch, owner)  # connect and prepare first
    time.sleep(max(0.0, start_at - time.time()))
    count, end = 0, start_at + seconds
    while time.time() < end:
        count += len(store.claim(queue, batch, owner))
    out.send(count)


def fill(db_url: str, queue: str, jobs: int) -> None:
    """``jobs`` ready jobs in ``queue``, written in one statement."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for name in (queue, queue + "-warm"):
            conn.execute("INSERT INTO job_queues (name) VALUES (%s) ON CONFLICT DO NOTHING", [name])
        conn.execute(
            "INSERT INTO jobs (id, queue_name, payload, priority) "
            "SELECT gen_random_uuid(), %s, '{}'::jsonb, 100 FROM generate_series(1, %s)",
            [queue, jobs],
        )
        conn.execute("VACUUM ANALYZE jobs")


def claim_rate(db_url: str, claimers: int, jobs: int, batch: int, seconds: float) -> float:
    queue = f"claims-{uuid.uuid4().hex[:8]}"
    fill(db_url, queue, jobs)
    start_at = time.time() + 1.0 + 0.1 * claimers
    pipes, procs = [], []
    for _ in range(claimers):
        ours, theirs = FORK.Pipe(duplex=False)
        proc = FORK.Process(target=_claimer, args=(db_url, queue, batch, start_at, seconds, theirs))
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    total = sum(int(p.recv()) for p in pipes)
    for proc in procs:
        proc.join()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs CASCADE")
    return total / seconds


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--producers", default="1,4,16", help="comma list of process counts")
    parser.add_argument("--claimers", default="8,64", help="comma list of process counts")
    parser.add_argument("--jobs", type=int, default=100_000, help="ready jobs per claim run")
    parser.add_argument("--claim-batch", type=int, default=1, help="jobs per claim statement")
    parser.add_argument("--seconds", type=float, default=5.0, help="window per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-claims", action="store_true", help="publish rates only")
    parser.add_argument(
        "--client",
        choices=("celery", "store"),
        default="celery",
        help="publish with noop.delay() (celery) or Store.enqueue() without Celery (store)",
    )
    args = parser.parse_args()
    producers = [int(p) for p in args.producers.split(",")]
    claimers = [] if args.no_claims else [int(c) for c in args.claimers.split(",")]
    publish: dict[int, list[float]] = {p: [] for p in producers}
    claims: dict[int, list[float]] = {c: [] for c in claimers}

    with scratch_database(args.url) as db_url:
        for round_no in range(args.rounds):
            for p in producers:
                rate, busy = publish_rate(db_url, p, args.seconds, args.client)
                publish[p].append(rate)
                print(
                    f"round {round_no + 1}: {p} producer(s) {rate:,.0f}/s, "
                    f"machine CPU {busy:.0f}% busy",
                    flush=True,
                )
            for c in claimers:
                claims[c].append(claim_rate(db_url, c, args.jobs, args.claim_batch, args.seconds))
                print(f"round {round_no + 1}: {c} claimers {claims[c][-1]:,.0f}/s", flush=True)

    print(f"\nProducers and claimers, {args.seconds:g} s windows, {args.rounds} round(s);")
    print("per second, median (min-max)\n")
    base = statistics.median(publish[producers[0]]) if producers else 0.0
    print(f"| producer processes | tasks published/s | x {producers[0]} producer(s) |")
    print("|---:|---:|---:|")
    for p, values in publish.items():
        print(f"| {p} | {summary(values)} | {statistics.median(values) / base:.2f}x |")
    if claimers:
        first = statistics.median(claims[claimers[0]])
        print(
            f"\n| claimers ({args.jobs:,} ready, {args.claim_batch} per claim) | jobs/s "
            f"| x {claimers[0]} claimers |"
        )
        print("|---:|---:|---:|")
        for c, values in claims.items():
            print(f"| {c} | {summary(values)} | {statistics.median(values) / first:.2f}x |")


if __name__ == "__main__":
    main()
