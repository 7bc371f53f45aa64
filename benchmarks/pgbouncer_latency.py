"""What PgBouncer changes: which pooling modes work, and the latency each adds.

    python benchmarks/pgbouncer_latency.py     # needs pgbouncer (Debian: apt-get install pgbouncer)
    python benchmarks/pgbouncer_latency.py --round-trips 200

Starts private PgBouncers (``auth_type = trust``, one per pooling mode, on free
ports) in front of the server at ``--url``. For each configuration, on a scratch
database: one ``celery worker -P threads -c 4`` and a client process, both through
the same route (direct or a PgBouncer) with the same transport options (broker and
result backend alike). The client publishes a no-op task and waits in ``get()``,
``--round-trips`` times one after another (after 5 unmeasured), then publishes 500
tasks in a loop. Printed per configuration: whether every task came back, p50 / p99
of publish -> ``get()`` returns, publishes per second, and the first error if any;
and the raw cost of ``SELECT 1`` through each route. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from celery_pgqueue import migrate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from transport_process.pgbouncer import running

APP = """\
import json, os
from celery import Celery

url = os.environ["CPQ_URL"]
options = json.loads(os.environ["CPQ_OPTIONS"])
app = Celery("bouncer", broker=url, backend=url)
app.conf.update(
    broker_transport_options=options,
    result_backend_transport_options=options,
    worker_hijack_root_logger=False,
)


@app.task(name="bouncer.noop")
def noop():
    return 1
"""

CLIENT = """\
import json, statistics, sys, time
from bouncer_app import noop
n = int(sys.argv[1])
out = {"latencies": [], "error": None}
try:
    for i in range(n + 5):
        t0 = time.perf_counter()
        assert noop.delay().get(timeout=20) == 1
        if i >= 5:
            out["latencies"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(500):
        noop.delay()
    out["publish_per_s"] = 500 / (time.perf_counter() - t0)
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"[:300]
print(json.dumps(out))
"""

NOTIFY_OFF = {"use_notify": False, "prepared_statements": False}
CONFIGS = [
    ("direct", None, {}),
    (
        "direct, use_notify/prepared_statements off, polling 0.1 s",
        None,
        {**NOTIFY_OFF, "polling_interval": 0.1},
    ),
    ("PgBouncer session pooling, defaults", "session", {}),
    ("PgBouncer transaction pooling, defaults (wrong)", "transaction", {}),
    (
        "PgBouncer transaction pooling, use_notify/prepared_statements off",
        "transaction",
        NOTIFY_OFF,
    ),
    (
        "PgBouncer transaction pooling, the same, polling 0.1 s",
        "transaction",
        {**NOTIFY_OFF, "polling_interval": 0.1},
    ),
    ("PgBouncer statement pooling, use_notify/prepared_statements off", "statement", NOTIFY_OFF),
]


@contextlib.contextmanager
def pgbouncer(server_url: str, mode: str) -> Iterator[int]:
    """The tests' PgBouncer launcher (one home), yielding only its port."""
    with running(server_url, mode) as (port, _log):
        yield port


def via(db_url: str, port: int | None) -> str:
    if port is None:
        return db_url
    parts = urlsplit(db_url)
    return parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{port}").geturl()


@contextlib.contextmanager
def scratch(admin_url: str, prefix: str = "cpq_bouncer") -> Iterator[str]:
    """A migrated database of its own on ``admin_url``'s server, dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db_url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        migrate.upgrade(db_url)
        yield db_url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def select_one(url: str, times: int = 2000) -> float:
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        runs = []
        for _ in range(times):
            t0 = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            runs.append(time.perf_counter() - t0)
    return statistics.median(runs) * 1000


def run_config(db_url: str, port: int | None, options: dict[str, object], n: int) -> str:
    folder = Path(tempfile.mkdtemp(prefix="cpq-bouncer-app-"))
    (folder / "bouncer_app.py").write_text(APP)
    url = "pgqueue://" + via(db_url, port).split("://", 1)[1]
    env = {**os.environ, "CPQ_URL": url, "CPQ_OPTIONS": json.dumps(options)}
    env["PYTHONPATH"] = str(folder)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bouncer_app", "worker", "-P", "threads",
         "-c", "4", "-l", "warning"],
        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(6)
        done = subprocess.run(
            [sys.executable, "-c", CLIENT, str(n)],
            cwd=folder, env=env, capture_output=True, text=True, timeout=30 + n * 3, check=False,
        )  # fmt: skip
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return f"client crashed: {done.stderr.strip().splitlines()[-1:]}"
    lat = sorted(out["latencies"])
    text = f"{len(lat)}/{n} round trips"
    if lat:
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        text += f"; p50 {statistics.median(lat) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
    if "publish_per_s" in out:
        text += f"; {out['publish_per_s']:.0f} publishes/s"
    if out["error"]:
        text += f"; ERROR {out['error']}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--round-trips", type=int, default=100)
    args = parser.parse_args()
    version = subprocess.run(
        [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "--version"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()[0]  # fmt: skip
    with psycopg.connect(args.url) as conn:
        print(f"PostgreSQL {conn.info.server_version}, {version}")
    with contextlib.ExitStack() as stack:
        ports: dict[str | None, int | None] = {None: None}
        for mode in ("session", "transaction", "statement"):
            ports[mode] = stack.enter_context(pgbouncer(args.url, mode))
        for mode, port in ports.items():
            print(
                f"SELECT 1, p50 of 2000, {mode or 'direct'}:"
                f" {select_one(via(args.url, port)):.3f} ms"
            )
        for label, mode, options in CONFIGS:
            slow = options.get("polling_interval", 1.0) == 1.0 and (
                mode is not None and options.get("use_notify") is False
            )
            n = max(20, args.round_trips // 4) if slow else args.round_trips
            with scratch(args.url) as db_url:
                result = run_config(db_url, ports[mode], options, n)
            print(f"{label} {json.dumps(options)}: {result}", flush=True)


if __name__ == "__main__":
    main()
