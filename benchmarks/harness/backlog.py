"""Claim cost against the table's size: ``python -m harness.backlog fill|measure ...``.

Each level (1k, 100k, 1M filler rows by default) has a database of its own, filled once
per run with ``generate_series`` INSERTs (no Python per row) and VACUUM ANALYZEd; every
round then measures each level in turn: 10,000 fresh jobs are queued, then claimed and
completed one at a time, single-threaded, for at most ``--time-cap`` seconds (the time
for all of them is extrapolated from the rate), and deleted again, so the filler is all
that differs between levels.

pgqueue filler, in equal parts: jobs of the same queue scheduled 30 days ahead (what
``countdown``/``eta`` leave in the table), due jobs of another queue, and completed jobs
of the same queue (history kept until retention prunes it). Measured jobs carry the
transport's real payload; filler rows a small one, to keep the fill fast.

sqla (Kombu's SQLAlchemy transport) filler, in equal parts: visible messages of another
queue and consumed (invisible) messages, which that transport never deletes. It has no
scheduled messages: ETA tasks wait in worker memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import psycopg

QUEUE = "backlog"
OTHER = "backlog_other"


def _vacuum(url: str, table: str) -> float:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"VACUUM ANALYZE {table}")  # type: ignore[arg-type]
    return time.perf_counter() - started


def _claimed(rows: Any, done: int, elapsed: float, jobs: int, vacuum_s: float) -> dict[str, Any]:
    """One level's figures, the same for either broker: rows, rate, extrapolated time."""
    return {
        "table_rows": rows[0] if rows else None,
        "claimed": done,
        "seconds": elapsed,
        "rate": done / elapsed if elapsed else None,
        "time_for_jobs": jobs * elapsed / done if done else None,
        "capped": done < jobs,
        "vacuum_seconds": vacuum_s,
    }


# -- pgqueue ---------------------------------------------------------------------------

PG_FILL = """
INSERT INTO jobs (id, queue_name, status, priority, payload, attempt_count, run_at,
                  started_at, completed_at, created_at, updated_at)
SELECT gen_random_uuid(),
       CASE k WHEN 1 THEN %(other)s ELSE %(queue)s END,
       CASE k WHEN 2 THEN 'completed' ELSE 'queued' END,
       100,
       '{"headers": {"task": "filler"}}'::jsonb,
       CASE k WHEN 2 THEN 1 ELSE 0 END,
       CASE k WHEN 0 THEN now() + interval '30 days' + g * interval '1 ms'
              ELSE now() - interval '1 hour' + g * interval '1 us' END,
       CASE k WHEN 2 THEN now() - interval '1 hour' END,
       CASE k WHEN 2 THEN now() - interval '1 hour' END,
       now() - interval '1 hour', now() - interval '1 hour'
FROM generate_series(0, %(rows)s - 1) AS g, LATERAL (SELECT g %% 3 AS k) AS kind
"""


def pgqueue_fill(url: str, rows: int) -> dict[str, Any]:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs, job_logs, job_queues CASCADE")
        conn.execute("INSERT INTO job_queues (name) VALUES (%s), (%s)", (QUEUE, OTHER))
        conn.execute(PG_FILL, {"queue": QUEUE, "other": OTHER, "rows": rows})  # type: ignore[arg-type]
    fill_s = time.perf_counter() - started
    return {"rows": rows, "fill_seconds": fill_s, "vacuum_seconds": _vacuum(url, "jobs")}


def pgqueue_measure(url: str, jobs: int, batch: int, cap: float) -> dict[str, Any]:
    from celery_pgqueue.states import JobStatus, LogStatus
    from celery_pgqueue.store import NewJob, Store
    from harness.messages import payload

    store = Store(url)
    store.ensure_queues([QUEUE, OTHER])
    docs = [payload() for _ in range(jobs)]
    # The measured jobs: the first 1,000 enqueued one per call and timed (as .delay()
    # does), the rest in batches of 1,000 (untimed).
    singles = min(1000, jobs)
    started = time.perf_counter()
    for job_id, doc in docs[:singles]:
        store.enqueue([NewJob(id=job_id, queue_name=QUEUE, payload=doc)])
    enqueue_s = time.perf_counter() - started
    rest = docs[singles:]
    for i in range(0, len(rest), 1000):
        chunk = rest[i : i + 1000]
        store.enqueue([NewJob(id=j, queue_name=QUEUE, payload=d) for j, d in chunk])
    done = 0
    started = time.perf_counter()
    deadline = started + cap
    while done < jobs and time.perf_counter() < deadline:
        claimed = store.claim(QUEUE, batch, "backlog")
        if not claimed:
            break
        for job in claimed:
            store.finish(
                job.id, attempt=job.attempt, status=JobStatus.COMPLETED,
                log_status=LogStatus.SUCCESS,
            )  # fmt: skip
        done += len(claimed)
    elapsed = time.perf_counter() - started
    store.dispose()
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT count(*) FROM jobs").fetchone()
        conn.execute("DELETE FROM jobs WHERE id = ANY(%s)", ([d[0] for d in docs],))
    vacuum_s = _vacuum(url, "jobs")
    return {
        **_claimed(rows, done, elapsed, jobs, vacuum_s),
        "enqueue_rate": singles / enqueue_s if enqueue_s else None,
    }


# -- Kombu's SQLAlchemy transport ------------------------------------------------------

SQLA_FILL = """
INSERT INTO kombu_message (id, visible, "timestamp", payload, version, queue_id)
SELECT nextval('message_id_sequence'), g %% 2 = 0,
       CASE WHEN g %% 2 = 0 THEN NULL ELSE now() END, %(payload)s, 1,
       CASE WHEN g %% 2 = 0 THEN %(other)s ELSE %(queue)s END
FROM generate_series(0, %(rows)s - 1) AS g
"""


def _sqla_queues(url: str) -> tuple[Any, Any, dict[str, int], str]:
    from kombu import Connection

    broker = "sqla+postgresql+psycopg://" + url.split("://", 1)[1]
    conn = Connection(broker)
    queue = conn.SimpleQueue(QUEUE)
    other = conn.SimpleQueue(OTHER)
    queue.put({"warm": True})
    other.put({"warm": True})
    queue.get(timeout=5).ack()
    with psycopg.connect(url, autocommit=True) as pg:
        ids = dict(pg.execute("SELECT name, id FROM kombu_queue").fetchall())
        sample = pg.execute("SELECT payload FROM kombu_message LIMIT 1").fetchone()
    return conn, queue, ids, sample[0] if sample else "{}"


def sqla_fill(url: str, rows: int) -> dict[str, Any]:
    conn, queue, ids, message = _sqla_queues(url)
    queue.close()
    conn.release()
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute("TRUNCATE kombu_message")
        pg.execute(
            SQLA_FILL,
            {"payload": message, "other": ids[OTHER], "queue": ids[QUEUE], "rows": rows},
        )  # type: ignore[arg-type]
    fill_s = time.perf_counter() - started
    return {"rows": rows, "fill_seconds": fill_s, "vacuum_seconds": _vacuum(url, "kombu_message")}


def sqla_measure(url: str, jobs: int, cap: float) -> dict[str, Any]:
    conn, queue, ids, message = _sqla_queues(url)
    with psycopg.connect(url, autocommit=True) as pg:
        before = pg.execute("SELECT coalesce(max(id), 0) FROM kombu_message").fetchone()
        pg.execute(
            "INSERT INTO kombu_message (id, visible, payload, version, queue_id)"
            " SELECT nextval('message_id_sequence'), true, %s, 1, %s"
            " FROM generate_series(1, %s)",
            (message, ids[QUEUE], jobs),
        )
    done = 0
    started = time.perf_counter()
    deadline = started + cap
    try:
        while done < jobs and time.perf_counter() < deadline:
            try:
                queue.get(block=False).ack()
            except queue.Empty:
                break
            done += 1
        elapsed = time.perf_counter() - started
    finally:
        queue.close()
        conn.release()
    with psycopg.connect(url, autocommit=True) as pg:
        rows = pg.execute("SELECT count(*) FROM kombu_message").fetchone()
        # The measured messages (and the warm-up's), consumed or not: ids above the filler's.
        pg.execute("DELETE FROM kombu_message WHERE id > %s", (before[0] if before else 0,))
    vacuum_s = _vacuum(url, "kombu_message")
    return _claimed(rows, done, elapsed, jobs, vacuum_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.backlog")
    parser.add_argument("action", choices=["fill", "measure"])
    parser.add_argument("target", choices=["pgqueue", "sqla"])
    parser.add_argument(
        "--level", action="append", required=True, metavar="ROWS=URL",
        help="filler rows and the libpq URL of that level's database (repeatable)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--time-cap", type=float, default=10.0)
    args = parser.parse_args(argv)
    outcome: dict[str, Any] = {}
    for spec in args.level:
        rows_text, _, url = spec.partition("=")
        rows = int(rows_text)
        if args.action == "fill":
            fill = pgqueue_fill if args.target == "pgqueue" else sqla_fill
            outcome[str(rows)] = fill(url, rows)
        elif args.target == "pgqueue":
            outcome[str(rows)] = pgqueue_measure(url, args.jobs, args.batch, args.time_cap)
        else:
            outcome[str(rows)] = sqla_measure(url, args.jobs, args.time_cap)
        outcome[str(rows)]["filler"] = rows
    sys.stdout.write(json.dumps(outcome) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
