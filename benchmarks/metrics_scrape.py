"""What one Prometheus scrape costs with a million rows in ``jobs``.

    python benchmarks/metrics_scrape.py                      # 1,000,000 rows, 20 scrapes
    python benchmarks/metrics_scrape.py --rows 100000 --running 100

Fills a scratch database (on ``--url``, dropped afterwards) the way retention leaves
one: mostly finished jobs over the last day, ``--queued`` waiting (half due, half
scheduled later), ``--running`` held, in 10 queues; VACUUM ANALYZE. Then times a fold
(maintenance's counting step, over the last ``FOLD_WINDOW``), the scrape's two
statements, a whole scrape through the WSGI app, and for comparison the
``job_queue_depth`` view, which counts every row. Prints EXPLAIN (ANALYZE, BUFFERS)
of the scrape's statements. A measurement, not a test: it never fails, it reports.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg
from backend_results import scratch_database
from sqlalchemy.dialects import postgresql

from celery_pgqueue.metrics import make_wsgi_app
from celery_pgqueue.store import Store
from celery_pgqueue.store import metrics as metrics_sql

FILL = """
INSERT INTO jobs (id, queue_name, status, priority, payload, attempt_count, run_at,
                  started_at, completed_at, failed_at, created_at, updated_at,
                  lease_owner, lease_expires_at)
SELECT gen_random_uuid(), 'q' || (1 + i %% 10), s.status, 100,
       '{"headers": {"task": "bench.noop"}}'::jsonb, 1,
       CASE WHEN s.status = 'queued' AND i %% 2 = 0 THEN now() + interval '1 hour'
            ELSE now() - (i %% 86400) * interval '1 second' END,
       CASE WHEN s.status <> 'queued' THEN now() - (i %% 86400) * interval '1 second' END,
       CASE WHEN s.status = 'completed' THEN now() - (i %% 86400) * interval '1 second' END,
       CASE WHEN s.status = 'failed' THEN now() - (i %% 86400) * interval '1 second' END,
       now() - (i %% 86400) * interval '1 second', now() - (i %% 86400) * interval '1 second',
       CASE WHEN s.status = 'running' THEN 'bench-worker' END,
       CASE WHEN s.status = 'running' THEN now() + interval '20 seconds' END
FROM generate_series(1, %(rows)s) AS i,
LATERAL (SELECT CASE
    WHEN i <= %(queued)s THEN 'queued'
    WHEN i <= %(queued)s + %(running)s THEN 'running'
    WHEN i %% 20 = 0 THEN 'failed'
    WHEN i %% 50 = 1 THEN 'cancelled'
    ELSE 'completed' END AS status) AS s
"""


def timed(step: Callable[[], Any], times: int) -> tuple[float, float, float]:
    """Median, min and max milliseconds of ``times`` runs."""
    runs = []
    for _ in range(times):
        started = time.perf_counter()
        step()
        runs.append((time.perf_counter() - started) * 1000)
    return statistics.median(runs), min(runs), max(runs)


def compiled(statement_of: Callable[[Any], Any]) -> str:
    captured: list[str] = []

    class Capture:
        def execute(self, stmt: Any, *args: Any) -> list[Any]:
            captured.append(
                str(
                    stmt.compile(
                        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
                    )
                )
            )
            return []

    statement_of(Capture())
    return captured[0]


def scrape(wsgi: Any) -> bytes:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}
    return b"".join(wsgi(environ, lambda status, headers: None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--running", type=int, default=200)
    parser.add_argument("--scrapes", type=int, default=20)
    args = parser.parse_args()

    with scratch_database(args.url) as db_url:
        measure(db_url, args)


def measure(db_url: str, args: argparse.Namespace) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO job_queues (name) SELECT 'q' || i FROM generate_series(1, 10) i")
        started = time.perf_counter()
        conn.execute(
            FILL,  # type: ignore[arg-type]
            {"rows": args.rows, "queued": args.queued, "running": args.running},
        )
        conn.execute("VACUUM ANALYZE jobs")
        # Counting starts a FOLD_WINDOW before the newest finished jobs.
        conn.execute("UPDATE job_counters SET counted_until = now() - interval '15 minutes'")
        print(
            f"filled {args.rows:,} rows ({args.queued:,} queued, {args.running:,} running)"
            f" in {time.perf_counter() - started:.1f} s"
        )
        store = Store.for_url("pgqueue://" + db_url.split("://", 1)[1])
        fold = timed(lambda: metrics_sql.fold(store, lag=0), 1)
        counted = sum(c.value for c in metrics_sql.snapshot(store).counters)
        print(f"first fold (15 minutes of finished jobs, {counted:,} counted): {fold[0]:.1f} ms")
        print(f"next fold (nothing new): {timed(lambda: metrics_sql.fold(store), 5)[0]:.1f} ms")

        wsgi = make_wsgi_app(store.url)
        scrape(wsgi)  # warm: connection, plans
        for name, step in (
            ("the two scrape statements", lambda: metrics_sql.snapshot(store)),
            ("whole scrape (WSGI, text)", lambda: scrape(wsgi)),
            (
                "job_queue_depth view (for comparison)",
                lambda: conn.execute("SELECT * FROM job_queue_depth").fetchall(),
            ),
        ):
            median, low, high = timed(step, args.scrapes)
            print(f"{name}: median {median:.1f} ms (min {low:.1f}, max {high:.1f})")
        for statement_of in (metrics_sql.queue_state, metrics_sql.counters):
            print(f"\nEXPLAIN (ANALYZE, BUFFERS) {statement_of.__name__}:")
            plan = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + compiled(statement_of)  # type: ignore[arg-type]
            ).fetchall()
            print("\n".join(row[0] for row in plan))
        print(f"\nscrape size: {len(scrape(wsgi)):,} bytes")


if __name__ == "__main__":
    main()
