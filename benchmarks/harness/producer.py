"""Publishes benchmark tasks from a process of its own: ``python -m harness.producer MODE``.

Modes (each prints one JSON object on its last stdout line):

``publish --n N --ids FILE [--countdown S]``
    ``noop.delay(time.time())`` N times in a loop (``apply_async`` with ``countdown``
    for the memory measure); the task ids go to FILE. Timed from the first call to the
    return of the last, after one warm-up that only opens the broker connection.
``paced --rate R --duration D --clients C [--get] --out FILE``
    R tasks/s for D seconds from C threads sharing one schedule (task i is due at
    ``t0 + i/R``). Each thread publishes its task and, with ``--get``, waits for the
    result before taking the next slot, so publish and ``get()`` happen in one thread
    (the rpc:// backend replies to the publishing thread's queue). FILE gets one JSON
    line per task: id, due, published (``time.time()`` passed to the task), sent,
    got.
``verify --ids FILE --sample K``
    States of K random ids from FILE, read from the result backend.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness.app import app, noop


def _warm_up() -> None:
    """Open the broker connection (and build the backend) before the clock starts."""
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)
    _note_reply_queue()


_reply_queues: set[str] = set()


def _note_reply_queue() -> None:
    """The rpc:// backend's reply queue of this thread, so the harness can delete it."""
    backend = app.backend  # one per thread
    if type(backend).__name__ == "RPCBackend":
        _reply_queues.add(str(backend.oid))


def publish(n: int, ids_file: Path, countdown: float | None) -> dict[str, Any]:
    _warm_up()
    ids: list[str] = []
    append = ids.append
    started = time.perf_counter()
    if countdown is None:
        for _ in range(n):
            append(noop.delay(time.time()).id)
    else:
        for _ in range(n):
            append(noop.apply_async((time.time(),), countdown=countdown).id)
    seconds = time.perf_counter() - started
    ids_file.write_text("\n".join(ids) + "\n")
    return {"published": n, "seconds": seconds, "rate": n / seconds if seconds else None}


def paced(
    rate: float, duration: float, clients: int, get: bool, out: Path, timeout: float
) -> dict[str, Any]:
    _warm_up()
    total = max(1, round(rate * duration))
    counter = itertools.count()
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    t0 = time.monotonic() + 0.2
    wall0 = time.time() + (t0 - time.monotonic())

    def client() -> None:
        _note_reply_queue()  # this thread's backend (Celery keeps one per thread)
        while True:
            i = next(counter)
            if i >= total:
                return
            due = t0 + i / rate
            if time.monotonic() > t0 + duration + 2.0:
                # A backend slower than clients/rate lowers the achieved rate; stop at
                # the planned duration (plus a little) rather than run on for minutes.
                return
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            published = time.time()
            try:
                result = noop.delay(published)
                sent = time.time()
                got = None
                if get:
                    result.get(timeout=timeout, propagate=True)
                    got = time.time()
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            row = {
                "id": result.id,
                "i": i,
                "due": wall0 + i / rate,
                "published": published,
                "sent": sent,
                "got": got,
            }
            with lock:
                rows.append(row)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + timeout + 30)
    elapsed = time.monotonic() - t0
    with out.open("w") as fh:
        for row in sorted(rows, key=lambda r: r["i"]):
            fh.write(json.dumps(row) + "\n")
    late = [r["published"] - r["due"] for r in rows]
    return {
        "tasks": len(rows),
        "planned": total,
        "errors": errors[:5],
        "error_count": len(errors),
        "seconds": elapsed,
        "achieved_rate": len(rows) / (max(r["published"] for r in rows) - wall0) if rows else 0,
        "max_late": max(late) if late else None,
    }


def verify(ids_file: Path, sample: int) -> dict[str, Any]:
    ids = [line for line in ids_file.read_text().split() if line]
    chosen = random.sample(ids, min(sample, len(ids)))
    states: dict[str, int] = {}
    for task_id in chosen:
        state = app.AsyncResult(task_id).state
        states[state] = states.get(state, 0) + 1
    return {"checked": len(chosen), "states": states}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.producer")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("publish")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--ids", type=Path, required=True)
    p.add_argument("--countdown", type=float)
    q = sub.add_parser("paced")
    q.add_argument("--rate", type=float, required=True)
    q.add_argument("--duration", type=float, required=True)
    q.add_argument("--clients", type=int, required=True)
    q.add_argument("--get", action="store_true")
    q.add_argument("--timeout", type=float, default=30.0)
    q.add_argument("--out", type=Path, required=True)
    v = sub.add_parser("verify")
    v.add_argument("--ids", type=Path, required=True)
    v.add_argument("--sample", type=int, default=20)
    args = parser.parse_args(argv)
    if args.mode == "publish":
        outcome = publish(args.n, args.ids, args.countdown)
    elif args.mode == "paced":
        outcome = paced(args.rate, args.duration, args.clients, args.get, args.out, args.timeout)
    else:
        outcome = verify(args.ids, args.sample)
    outcome["reply_queues"] = sorted(_reply_queues)
    sys.stdout.write(json.dumps(outcome) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
