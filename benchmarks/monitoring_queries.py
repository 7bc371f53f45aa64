"""Runs every monitoring query of docs/monitoring.md on a database with real activity.

    python benchmarks/monitoring_queries.py          # needs psql; the machine's server

On a scratch database: a ``celery worker -P threads -c 2`` (queues ``celery`` and
``reports``), 20 tasks that succeed, 3 that fail, one that is still running (60 s),
2 with a one-hour countdown, and 2 waiting in the paused queue ``reports``. Then each
query of ``QUERIES`` runs through ``psql`` and ``celery-pgqueue status`` runs, and
their output is printed as the docs show it. A command to rerun, not a test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
from psycopg import sql

from celery_pgqueue import migrate

QUERIES = {
    "job_queue_depth": (
        "SELECT queue_name, is_active, queued, ready, scheduled, running, failed,"
        " date_trunc('second', oldest_ready_age) AS oldest_ready_age, expired_leases"
        " FROM job_queue_depth WHERE expires_at IS NULL ORDER BY queue_name;"
    ),
    "job_queue_throughput": (
        "SELECT queue_name, completed_5m, failed_5m, per_minute_5m, failure_rate_5m"
        " FROM job_queue_throughput WHERE completed_1h + failed_1h > 0 ORDER BY queue_name;"
    ),
    "job_running": (
        "SELECT task, attempt, lease_owner, date_trunc('second', running_for) AS running_for,"
        " date_trunc('second', lease_remaining) AS lease_remaining, lease_expired, acked"
        " FROM job_running ORDER BY started_at;"
    ),
    "alert: a queue whose oldest due job waited over 5 minutes, or a lapsed lease": (
        "SELECT queue_name, oldest_ready_age, expired_leases FROM job_queue_depth"
        " WHERE oldest_ready_age > interval '5 minutes' OR expired_leases > 0;"
    ),
    "recent failures (the jobs table itself)": (
        "SELECT payload->'headers'->>'task' AS task, last_error_message,"
        " date_trunc('second', failed_at) AS failed_at FROM jobs"
        " WHERE status = 'failed' ORDER BY failed_at DESC LIMIT 5;"
    ),
}

APP = """\
import os, time
from celery import Celery

url = os.environ["CPQ_URL"]
app = Celery("shop", broker=url, backend=url)
app.conf.update(worker_hijack_root_logger=False)


@app.task(name="shop.send_receipt")
def send_receipt(order_id):
    return order_id


@app.task(name="shop.charge")
def charge(order_id):
    raise ValueError(f"card declined for order {order_id}")


@app.task(name="shop.rebuild_index")
def rebuild_index():
    time.sleep(60)


@app.task(name="reports.daily")
def daily():
    return "report"
"""

SEND = """\
from shop_app import send_receipt, charge, rebuild_index, daily
from celery_pgqueue import api
from shop_app import app
api.pause(app, "reports")
rebuild_index.delay()
for i in range(20):
    send_receipt.delay(i)
for i in range(3):
    charge.delay(i)
for i in range(2):
    send_receipt.apply_async((100 + i,), countdown=3600)
    daily.apply_async(queue="reports")
"""


def flower(folder: Path, env: dict[str, str]) -> None:
    """What Flower answers next to a pgqueue worker: its Broker tab and queue lengths."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "shop_app", "flower", f"--port={port}",
         "--address=127.0.0.1"],
        cwd=folder, env={**env, "FLOWER_UNAUTHENTICATED_API": "true"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(8)  # Flower starts and hears the worker's heartbeat
        for path in ("/api/workers?refresh=1", "/broker", "/api/queues/length"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as r:
                    print(f"Flower GET {path}: HTTP {r.status}, {len(r.read())} bytes")
            except urllib.error.HTTPError as exc:
                print(f"Flower GET {path}: HTTP {exc.code} {exc.read().decode()[:120]!r}")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)


def main() -> None:
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    name = f"cpq_monitor_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db_url = admin.rsplit("/", 1)[0] + "/" + name
    folder = Path(tempfile.mkdtemp(prefix="cpq-monitor-"))
    (folder / "shop_app.py").write_text(APP)
    env = {**os.environ, "CPQ_URL": "pgqueue://" + db_url.split("://", 1)[1]}
    env["PYTHONPATH"] = str(folder)
    worker = None
    try:
        migrate.upgrade(db_url)
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "shop_app", "worker", "-P", "threads",
             "-c", "2", "-Q", "celery,reports", "-E", "-l", "warning"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        subprocess.run([sys.executable, "-c", SEND], cwd=folder, env=env, check=True)
        with psycopg.connect(db_url, autocommit=True) as conn:
            for _ in range(120):
                row = conn.execute(
                    "SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed')"
                ).fetchone()
                if row and row[0] >= 23:
                    break
                time.sleep(0.5)
        time.sleep(2)
        for label, query in QUERIES.items():
            print(f"-- {label}\n{query}")
            done = subprocess.run(
                ["psql", "-X", db_url, "-c", query], capture_output=True, text=True, check=True
            )
            print(done.stdout)
        status = subprocess.run(
            [sys.executable, "-m", "celery_pgqueue", "--url", db_url, "status"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        print(f"$ celery-pgqueue --url … status\n{status.stdout}")
        flower(folder, env)
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGKILL)  # the 60 s task need not finish
            worker.wait(10)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
