"""The raw ceiling: pgqueue's own statements through ``Store``, without Celery or Kombu.

``python -m harness.ceiling --url URL --n N --threads 1,2`` prints one JSON object.

* enqueue: ``Store.enqueue([NewJob])`` once per job, as ``.delay()`` does, with the
  payload the transport would store for the benchmark task;
* claim: ``Store.claim(limit)``, one ``Store.mark_acked`` for what it took (the
  worker's early acks, which the transport defers and writes in one statement), then
  per job ``Store.finish(COMPLETED, SUCCESS)`` (what a finished task writes): the
  statements a Celery worker on pgqueue runs per task, at limit 1 and at a batch;
  with ``--finish-many`` also each claimed batch finished by one ``Store.finish_many``
  (``FINISH_MANY``, the ack riding in it: batched completions);
* celery_publish: ``.delay()`` on Kombu's in-process ``memory://`` transport, no
  broker at all: what Celery itself costs per publish, the part no broker can remove;
* handoff: publish -> claimed latency at a steady rate (``--handoff-rate`` jobs/s for
  ``--handoff-n`` jobs): one thread ``Store.enqueue``s, another sleeps on the LISTEN
  socket and claims what the NOTIFY announces. The same with Redis (``LPUSH`` ->
  ``BRPOP``, the list operations Celery's Redis transport uses) when ``--redis-url``
  is given. The floor under Celery's publish -> start latency: what is left of it is
  Celery's own path (message building, the worker's event loop, the pipe to the pool
  process), the same for every broker.

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


def claim(
    url: str, n: int, threads: int, batch: int, ack: bool, many: bool = False
) -> dict[str, Any]:
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
            if many:  # batched completions: one FINISH_MANY, the ack riding in it
                from celery_pgqueue.store.batches import Finish

                store.finish_many(
                    [
                        Finish(job.id, job.attempt, JobStatus.COMPLETED, LogStatus.SUCCESS)
                        for job in claimed
                    ],
                    notify=False,
                )
                done[index] += len(claimed)
                continue
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
    return {
        "jobs": total,
        "seconds": elapsed,
        "rate": total / elapsed,
        "batch": batch,
        "ack": ack,
        "finish_many": many,
    }


def _percentiles(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0

    return {"n": len(ordered), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1e3}


def _paced(n: int, rate: float, send: Any) -> None:
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(i)


def celery_publish(n: int) -> dict[str, Any]:
    """``noop.delay()`` N times on ``memory://``: Celery's and Kombu's own publish cost."""
    from celery import Celery

    app = Celery("ceiling", broker="memory://", set_as_current=False)
    app.conf.task_ignore_result = True

    @app.task(name="bench.noop", shared=False)
    def noop(published_at: float | None = None) -> None:
        return None

    noop.delay(time.time())  # opens the connection, as the benchmark producer's warm-up
    started = time.perf_counter()
    for _ in range(n):
        noop.delay(time.time())
    elapsed = time.perf_counter() - started
    app.close()
    return {"jobs": n, "seconds": elapsed, "rate": n / elapsed}


def handoff(url: str, n: int, rate: float) -> dict[str, Any]:
    """publish -> claimed through Store and LISTEN/NOTIFY, no Celery."""
    from celery_pgqueue.store import NewJob
    from celery_pgqueue.store.listener import Listener

    _reset(url)
    store = _store(url)
    store.ensure_queues([QUEUE])
    docs = [payload() for _ in range(n)]
    sent: dict[Any, float] = {}
    took: list[float] = []
    listener = Listener(store.url, [store.channel], connect_timeout=5)
    listener.connect()
    done = threading.Event()

    def consume() -> None:
        while not done.is_set():
            if listener.wait(0.2):
                while True:
                    claimed = store.claim(QUEUE, 8, "handoff")
                    now = time.perf_counter()
                    took.extend(now - sent[job.id] for job in claimed)
                    if len(claimed) < 8:
                        break

    thread = threading.Thread(target=consume)
    thread.start()

    def send(i: int) -> None:
        job_id, doc = docs[i]
        sent[job_id] = time.perf_counter()
        store.enqueue([NewJob(id=job_id, queue_name=QUEUE, payload=doc)])

    _paced(n, rate, send)
    deadline = time.monotonic() + 10
    while len(took) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    thread.join()
    listener.close()
    store.dispose()
    return _percentiles(took[n // 10 :]) | {"rate": rate}


def handoff_redis(redis_url: str, n: int, rate: float) -> dict[str, Any]:
    """publish -> popped through Redis LPUSH/BRPOP, no Celery."""
    import redis

    key = "celery-pgqueue-bench-handoff"
    producer, consumer = redis.Redis.from_url(redis_url), redis.Redis.from_url(redis_url)
    producer.delete(key)
    sent: dict[bytes, float] = {}
    took: list[float] = []
    body = json.dumps(payload()[1])

    def consume() -> None:
        while len(took) < n:
            item = consumer.brpop([key], timeout=1)
            if item is None:
                continue
            job_id = item[1].split(b" ", 1)[0]
            took.append(time.perf_counter() - sent[job_id])

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()

    def send(i: int) -> None:
        job_id = str(i).encode()
        sent[job_id] = time.perf_counter()
        producer.lpush(key, job_id + b" " + body.encode())

    _paced(n, rate, send)
    thread.join(timeout=10)
    producer.delete(key)
    return _percentiles(took[n // 10 :]) | {"rate": rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.ceiling")
    parser.add_argument("--url", required=True, help="libpq URL of a migrated database")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch", default="1")
    parser.add_argument("--no-ack", action="store_true")
    parser.add_argument(
        "--finish-many",
        action="store_true",
        help="also finish each claimed batch with one FINISH_MANY (acks riding in it)",
    )
    parser.add_argument("--handoff-n", type=int, default=1000, help="0: skip")
    parser.add_argument("--handoff-rate", type=float, default=100.0)
    parser.add_argument("--redis-url", help="also measure Redis's handoff floor")
    args = parser.parse_args(argv)
    outcome: dict[str, Any] = {"celery_publish_t1": celery_publish(args.n)}
    if args.handoff_n:
        outcome["handoff"] = handoff(args.url, args.handoff_n, args.handoff_rate)
        if args.redis_url:
            outcome["handoff_redis"] = handoff_redis(
                args.redis_url, args.handoff_n, args.handoff_rate
            )
    for threads in (int(t) for t in args.threads.split(",")):
        outcome[f"enqueue_t{threads}"] = enqueue(args.url, args.n, threads)
        for batch in (int(b) for b in args.batch.split(",")):
            outcome[f"claim_b{batch}_t{threads}"] = claim(
                args.url, args.n, threads, batch, not args.no_ack
            )
            if args.finish_many:
                outcome[f"claim_b{batch}_t{threads}_many"] = claim(
                    args.url, args.n, threads, batch, not args.no_ack, many=True
                )
    _reset(args.url)
    sys.stdout.write(json.dumps(outcome) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
