"""The raw ceiling: pgqueue's own statements through ``Store``, without Celery or Kombu.

``python -m harness.ceiling --url URL --n N --threads 1,2`` prints one JSON object.

* enqueue: ``Store.enqueue([NewJob])`` once per job, as ``.delay()`` does, with the
  payload the transport would store for the benchmark task;
* claim: ``Store.claim(limit)``, one ``Store.mark_acked`` for what it took (the
  worker's early acks, which the transport defers and writes in one statement), then
  per job ``Store.finish(COMPLETED, SUCCESS)`` (what a finished task writes): the
  statements a Celery worker on pgqueue runs per task, at limit 1 and at a batch.

Each variant starts from empty tables; with T threads, each thread does N/T jobs
(enqueue) or claims until the queue is empty (claim). One Store per process, as in
Celery, so threads share its pool.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import psycopg

from harness.messages import payload

QUEUE = "ceiling"


def _reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs, job_logs, job_queues CASCADE")


def _store(url: str) -> Any:
    from celery_pgqueue.store import Store

    return Store(url)


def _run_threads(count: int, target: Any) -> float:
    barrier = threading.Barrier(count + 1)
    errors: list[BaseException] = []

    def wrapped(index: int) -> None:
        barrier.wait()
        try:
            target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


def enqueue(url: str, n: int, threads: int) -> dict[str, Any]:
    from celery_pgqueue.store import NewJob

    _reset(url)
    store = _store(url)
    store.ensure_queues([QUEUE])
    docs = [payload() for _ in range(n)]
    per = [docs[i::threads] for i in range(threads)]

    def work(index: int) -> None:
        for job_id, doc in per[index]:
            store.enqueue([NewJob(id=job_id, queue_name=QUEUE, payload=doc)])

    elapsed = _run_threads(threads, work)
    store.dispose()
    return {"jobs": n, "seconds": elapsed, "rate": n / elapsed}


def claim(url: str, n: int, threads: int, batch: int, ack: bool) -> dict[str, Any]:
    from celery_pgqueue.states import JobStatus, LogStatus
    from celery_pgqueue.store import NewJob

    _reset(url)
    store = _store(url)
    store.ensure_queues([QUEUE])
    for start in range(0, n, 1000):
        chunk = [payload() for _ in range(min(1000, n - start))]
        store.enqueue([NewJob(id=i, queue_name=QUEUE, payload=d) for i, d in chunk])
    done = [0] * threads
    owner = "ceiling"

    def work(index: int) -> None:
        while True:
            claimed = store.claim(QUEUE, batch, f"{owner}-{index}")
            if not claimed:
                return
            if ack:  # the transport defers acks and writes a batch in one statement
                store.mark_acked([(job.id, job.attempt) for job in claimed])
            for job in claimed:
                store.finish(
                    job.id,
                    attempt=job.attempt,
                    status=JobStatus.COMPLETED,
                    log_status=LogStatus.SUCCESS,
                )
            done[index] += len(claimed)

    elapsed = _run_threads(threads, work)
    store.dispose()
    total = sum(done)
    return {"jobs": total, "seconds": elapsed, "rate": total / elapsed, "batch": batch, "ack": ack}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.ceiling")
    parser.add_argument("--url", required=True, help="libpq URL of a migrated database")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch", default="1")
    parser.add_argument("--no-ack", action="store_true")
    args = parser.parse_args(argv)
    outcome: dict[str, Any] = {}
    for threads in (int(t) for t in args.threads.split(",")):
        outcome[f"enqueue_t{threads}"] = enqueue(args.url, args.n, threads)
        for batch in (int(b) for b in args.batch.split(",")):
            outcome[f"claim_b{batch}_t{threads}"] = claim(
                args.url, args.n, threads, batch, not args.no_ack
            )
    _reset(args.url)
    sys.stdout.write(json.dumps(outcome) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
