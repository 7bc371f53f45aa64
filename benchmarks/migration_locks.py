"""Which migration locks which table, and for how long, with a million rows in ``jobs``.

    python benchmarks/migration_locks.py                  # private embedded server, 1,000,000 rows
    python benchmarks/migration_locks.py --rows 100000 --url postgresql://postgres@127.0.0.1:5432/postgres

Starts a private embedded PostgreSQL (durable settings: fsync, synchronous_commit and
full_page_writes on) unless ``--url`` names a server, migrates a scratch database to
0001, fills ``jobs`` the way retention leaves it (``metrics_scrape.FILL``: mostly
finished jobs, 10,000 queued, 200 running, 10 queues) and VACUUM ANALYZEs it. Then
runs every migration on its own, upgrade 0001 -> 0002 -> ... -> head, then every
downgrade back to 0002, then the whole upgrade 0002 -> head in one go (one
transaction, as ``celery-pgqueue migrate`` runs it), each through
``celery_pgqueue.migrate`` (what the CLI calls).

While each one runs, a sampler reads ``pg_locks`` every millisecond for the migrating
session and two probes stand in for the application, in autocommit, one statement
after another: a *writer* inserting into ``jobs`` (a publish; a claim's UPDATE needs
the same lock) and a *reader* of ``job_queues`` (every claim reads it). Printed per
run: wall time, each existing table the migration locked with the strongest mode seen
(locks are held until the migration's transaction commits), and the longest time each
probe waited. A measurement, not a test: it never fails, it reports.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
from metrics_scrape import FILL
from psycopg import sql

from celery_pgqueue import migrate
from celery_pgqueue.devserver import EmbeddedPostgres
from celery_pgqueue.migrate import head_revision

# Strongest last, as PostgreSQL orders its table lock modes.
MODES = [
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
]
BLOCKS = {
    "ShareLock": "blocks writes (INSERT/UPDATE/DELETE)",
    "ShareRowExclusiveLock": "blocks writes",
    "ExclusiveLock": "blocks writes",
    "AccessExclusiveLock": "blocks reads and writes",
}
TIER_TABLES = {"job_queues", "jobs", "job_logs", "job_bindings", "job_groups", "job_chord_parts"}


@dataclass
class Probe:
    name: str
    statement: str
    waits: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    durable = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
    with EmbeddedPostgres(settings=durable) as embedded:
        yield embedded.url()


@contextlib.contextmanager
def scratch(admin_url: str) -> Iterator[str]:
    name = f"cpq_locks_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def run_probe(url: str, probe: Probe, stop: threading.Event, pids: list[int]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        pids.append(conn.info.backend_pid)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                conn.execute(probe.statement)  # type: ignore[arg-type]
            except psycopg.Error as exc:
                probe.errors.append(str(exc).splitlines()[0])
            probe.waits.append(time.perf_counter() - started)
            stop.wait(0.005)


def sample(url: str, stop: threading.Event, pids: list[int], seen: dict[str, str]) -> None:
    """Strongest granted lock seen per existing relation, of sessions not ours."""
    with psycopg.connect(url, autocommit=True) as conn:
        pids.append(conn.info.backend_pid)
        while not stop.is_set():
            rows = conn.execute(
                "SELECT c.relname, l.mode FROM pg_locks l"
                " JOIN pg_class c ON c.oid = l.relation"
                " JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'"
                " WHERE l.locktype = 'relation' AND l.granted"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND NOT l.pid = ANY(%s)",
                (pids,),
            ).fetchall()
            for relname, mode in rows:
                if relname in TIER_TABLES and (
                    relname not in seen or MODES.index(mode) > MODES.index(seen[relname])
                ):
                    seen[relname] = mode
            time.sleep(0.001)


def measured(url: str, label: str, action: str, revision: str) -> None:
    stop = threading.Event()
    pids: list[int] = []
    seen: dict[str, str] = {}
    probes = [
        Probe(
            "writer (INSERT INTO jobs)",
            "INSERT INTO jobs (id, queue_name, status, priority, payload)"
            " VALUES (gen_random_uuid(), 'q1', 'completed', 100, '{}')",
        ),
        Probe(
            "reader (SELECT FROM job_queues)",
            "SELECT is_active FROM job_queues WHERE name = 'q1'",
        ),
    ]
    threads = [threading.Thread(target=sample, args=(url, stop, pids, seen))]
    threads += [threading.Thread(target=run_probe, args=(url, p, stop, pids)) for p in probes]
    for thread in threads:
        thread.start()
    while len(pids) < len(threads):
        time.sleep(0.01)
    time.sleep(0.3)  # baseline statements before the migration starts
    baseline = {p.name: max(p.waits) for p in probes}
    for probe in probes:
        probe.waits.clear()
    seen.clear()  # only what is seen once every session of ours is known
    started = time.perf_counter()
    getattr(migrate, action)(url, revision)
    elapsed = time.perf_counter() - started
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join()
    print(f"\n## {label} ({action} to {revision}): {elapsed:.2f} s")
    if not seen:
        print("  existing tier tables locked: none")
    for relname in sorted(seen):
        mode = seen[relname]
        print(f"  {relname}: {mode} ({BLOCKS.get(mode, 'blocks neither reads nor writes')})")
    for probe in probes:
        during = max(probe.waits)
        print(
            f"  longest {probe.name}: {during * 1000:.0f} ms"
            f" (before the migration: {baseline[probe.name] * 1000:.0f} ms)"
            + (f"; errors: {sorted(set(probe.errors))}" if probe.errors else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="admin URL of a server (default: a private embedded one)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    head = head_revision()
    revisions = [f"{n:04d}" for n in range(2, int(head) + 1)]
    with server(args.url) as admin_url, scratch(admin_url) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            print(f"server: PostgreSQL {conn.info.server_version}")
            migrate.upgrade(url, "0001")
            conn.execute(
                "INSERT INTO job_queues (name) SELECT 'q' || i FROM generate_series(1, 10) i"
            )
            started = time.perf_counter()
            conn.execute(FILL, {"rows": args.rows, "queued": 10_000, "running": 200})  # type: ignore[arg-type]
            conn.execute("VACUUM ANALYZE jobs")
            size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('jobs'))").fetchone()
            print(
                f"jobs: {args.rows:,} rows, {size[0] if size else '?'} with indexes,"
                f" filled in {time.perf_counter() - started:.1f} s"
            )
        for revision in revisions:
            measured(url, f"migration {revision}", "upgrade", revision)
        for revision in reversed(revisions):
            previous = f"{int(revision) - 1:04d}"
            measured(url, f"rollback of {revision}", "downgrade", previous)
        migrate.upgrade(url, "0002")
        measured(url, f"all of 0002 -> {head} in one transaction", "upgrade", head)


if __name__ == "__main__":
    main()
