"""Retention soak: does the tier stay bounded under steady traffic?

Enqueues, claims and finishes jobs at a steady rate (default 200/s, 1% failing) with
short retention (default 60 s), plus unconsumed transient messages with a TTL, while
``maintenance.run_once`` runs every 5 s as a worker's background thread would. Every
30 s it samples row counts, ``pg_total_relation_size`` and dead tuples of ``jobs``
and ``job_logs``. With retention working, every column plateaus after about one
retention period; a column that keeps climbing is a leak.

    python benchmarks/retention_soak.py --minutes 10 --out soak.jsonl

It creates a scratch database on the server of ``--url`` (dropped afterwards unless
``--keep``), or with ``--embedded`` starts a private server with PostgreSQL's default
autovacuum: a CI server tuned with ``autovacuum = off`` never reclaims dead tuples, so
the table size would climb there whatever retention does. A measurement, not a
test: it never fails, it reports. The producer never bursts to catch up: if the
machine can't keep the rate, the achieved rate is what the table shows.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import threading
import time
import uuid
from dataclasses import asdict
from typing import Any

import psycopg
from psycopg import sql

from celery_pgqueue.maintenance import MaintenanceReport, run_once
from celery_pgqueue.migrate import upgrade
from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import NewJob, Store

SAMPLE_SQL = """
SELECT
    (SELECT count(*) FROM jobs) AS jobs_rows,
    (SELECT count(*) FROM jobs WHERE status = 'completed') AS completed,
    (SELECT count(*) FROM jobs WHERE status = 'failed') AS failed,
    (SELECT count(*) FROM jobs WHERE status = 'queued') AS queued,
    (SELECT count(*) FROM job_logs) AS log_rows,
    pg_total_relation_size('jobs') AS jobs_bytes,
    pg_total_relation_size('job_logs') AS logs_bytes,
    (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'jobs') AS jobs_dead,
    (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'job_logs') AS logs_dead,
    (SELECT autovacuum_count FROM pg_stat_user_tables WHERE relname = 'jobs') AS jobs_autovacuums
"""

COLUMNS = (
    ("t_s", 6),
    ("done", 8),
    ("jobs_rows", 9),
    ("completed", 9),
    ("failed", 6),
    ("queued", 6),
    ("log_rows", 8),
    ("jobs_MB", 7),
    ("logs_MB", 7),
    ("jobs_dead", 9),
    ("logs_dead", 9),
    ("avac", 4),
    ("pruned", 8),
    ("expired", 7),
)


def with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


class Soak:
    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.args = args
        self.options = PgQueueOptions(
            completed_retention=args.retention,
            failed_retention=args.retention * 2,
            log_retention=args.retention * 2,
            maintenance_interval=args.maintenance_every,
            prune_batch_size=args.batch,
        )
        self.store = Store(url, self.options)
        self.url = url
        self.done = 0
        self.pruned = 0
        self.expired = 0
        self.passes: list[MaintenanceReport] = []
        self.stop = threading.Event()

    def produce(self, deadline: float) -> None:
        """Enqueue, claim and finish jobs in ticks of 100 ms at the target rate."""
        tick = 0.1
        per_tick = self.args.rate * tick
        owed = 0.0
        start = time.monotonic()
        n = 0
        while time.monotonic() < deadline:
            owed += per_tick
            count, owed = int(owed), owed - int(owed)
            if time.monotonic() - (start + n / self.args.rate) > 1.0:
                # More than a second behind: don't burst to catch up, restart the clock.
                start = time.monotonic() - n / self.args.rate
            new = [
                NewJob(
                    id=uuid.uuid4(),
                    queue_name="soak",
                    payload={"headers": {"task": "soak.work"}, "body": [[n + i], {}, {}]},
                )
                for i in range(count)
            ]
            n += count
            self.store.enqueue(new)
            # Transient traffic nobody consumes (think event messages): TTL then drop.
            if self.args.transient_rate:
                ttl_count = max(1, int(self.args.transient_rate * tick))
                self.store.enqueue(
                    [
                        NewJob(
                            id=uuid.uuid4(),
                            queue_name="soak.events",
                            payload={"headers": {}, "body": {}},
                            ttl_seconds=5.0,
                        )
                        for _ in range(ttl_count)
                    ]
                )
            for job in self.store.claim("soak", count, owner="soak-worker"):
                fail = job.payload["body"][0][0] % 100 == 0
                self.store.finish(
                    job.id,
                    attempt=job.attempt,
                    status=JobStatus.FAILED if fail else JobStatus.COMPLETED,
                    log_status=LogStatus.FAILED if fail else LogStatus.SUCCESS,
                    error_message="RuntimeError: soak" if fail else None,
                )
                self.done += 1
            next_tick = start + (n / self.args.rate)
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def maintain(self) -> None:
        while not self.stop.wait(self.args.maintenance_every):
            report = run_once(self.store, completed_retention=self.args.retention)
            self.passes.append(report)
            p = report.pruned
            self.pruned += p.completed + p.failed + p.cancelled
            self.expired += report.expired_messages

    def sample(self, conn: psycopg.Connection[Any], elapsed: float) -> dict[str, Any]:
        row = conn.execute(SAMPLE_SQL).fetchone()
        assert row is not None
        names = [d.name for d in conn.execute(SAMPLE_SQL).description or []]
        values = dict(zip(names, row, strict=True))
        return {
            "t_s": round(elapsed),
            "done": self.done,
            **values,
            "jobs_MB": round(values["jobs_bytes"] / 1e6, 2),
            "logs_MB": round(values["logs_bytes"] / 1e6, 2),
            "avac": values["jobs_autovacuums"],
            "pruned": self.pruned,
            "expired": self.expired,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="jobs per second")
    parser.add_argument("--transient-rate", type=float, default=10.0, help="TTL messages/s")
    parser.add_argument("--retention", type=float, default=60.0, help="seconds")
    parser.add_argument("--maintenance-every", type=float, default=5.0)
    parser.add_argument("--sample-every", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=1000, help="prune_batch_size")
    parser.add_argument("--out", default="retention_soak.jsonl")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument(
        "--embedded", action="store_true", help="run on a private server, autovacuum on"
    )
    args = parser.parse_args()

    # SIGTERM ends the run like Ctrl-C, so the scratch database is still dropped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    server = None
    if args.embedded:
        from celery_pgqueue.devserver import EmbeddedPostgres

        server = EmbeddedPostgres(settings={"autovacuum": "on", "fsync": "on"})
        server.start()
        args.url = server.url()
    try:
        run(args)
    finally:
        if server is not None:
            server.cleanup()


def run(args: argparse.Namespace) -> None:
    name = f"cpq_soak_{secrets.token_hex(4)}"
    with psycopg.connect(args.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(args.url, name)
    upgrade(url)
    soak = Soak(url, args)
    started = time.monotonic()
    deadline = started + args.minutes * 60
    producer = threading.Thread(target=soak.produce, args=(deadline,), daemon=True)
    maintainer = threading.Thread(target=soak.maintain, daemon=True)
    producer.start()
    maintainer.start()
    with psycopg.connect(url) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('autovacuum', 'autovacuum_naptime', 'server_version')"
            ).fetchall()
        )
    print(
        f"server {settings.get('server_version')}: autovacuum {settings.get('autovacuum')}, "
        f"naptime {settings.get('autovacuum_naptime')}s"
    )
    print(
        f"soak: {args.rate:g} jobs/s (1% failing) + {args.transient_rate:g} TTL messages/s, "
        f"retention {args.retention:g}s (failed/logs {args.retention * 2:g}s), maintenance "
        f"every {args.maintenance_every:g}s, {args.minutes:g} min, database {name}"
    )
    print("  ".join(f"{c:>{w}}" for c, w in COLUMNS), flush=True)
    try:
        with psycopg.connect(url, autocommit=True) as conn, open(args.out, "w") as out:
            while True:
                now = time.monotonic()
                row = soak.sample(conn, now - started)
                out.write(json.dumps(row) + "\n")
                out.flush()
                print("  ".join(f"{row[c]!s:>{w}}" for c, w in COLUMNS), flush=True)
                if now >= deadline:
                    break
                time.sleep(min(args.sample_every, max(0.0, deadline - now) + 0.5))
        producer.join()
        soak.stop.set()
        maintainer.join()
        ran = [p for p in soak.passes if p.ran]
        slowest = max((p.seconds for p in ran), default=0.0)
        print(
            f"done {soak.done} jobs in {time.monotonic() - started:.0f}s "
            f"({soak.done / (time.monotonic() - started):.0f}/s); {len(ran)} maintenance passes, "
            f"slowest {slowest:.3f}s; results in {args.out}"
        )
        summary = {"summary": True, "passes": len(ran), "slowest_pass_s": slowest}
        summary["last_pass"] = asdict(ran[-1]) if ran else None
        with open(args.out, "a") as out:
            out.write(json.dumps(summary, default=str) + "\n")
    finally:
        soak.store.dispose()
        if not args.keep:
            with psycopg.connect(args.url, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


if __name__ == "__main__":
    main()
