"""How many PostgreSQL server connections each kind of process holds, idle and under load.

    python benchmarks/connections.py                 # the machine's server
    python benchmarks/connections.py --tasks 5000 --only workers

Every scenario runs real processes (``celery worker``, a producer script, a script
waiting in ``AsyncResult.get()``) on a scratch database of its own, migrated, with the
same ``pgqueue://`` URL as broker and result backend and default options
(``pool_size`` 5, ``max_overflow`` 10). A sampler counts that database's rows of
``pg_stat_activity`` every 50 ms, by ``application_name`` (``celery-pgqueue``: the
connection pool; ``-listen``: LISTEN for wake-ups and results; ``-lease``: the lease
keeper), leaving out its own session, the load publisher's (named ``bench-load``) and
sessions still logging in (no name yet). Printed: the most seen at once while idle
(5 s after start-up) and under load (while ``--tasks`` tasks of 5 ms each, with
results, drain). A measurement, not a test: it never fails, it reports.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from pgbouncer_latency import pgbouncer, scratch, via

APP = """\
import json, os, time
from celery import Celery

url = os.environ["CPQ_URL"]
options = json.loads(os.environ.get("CPQ_OPTIONS", "{}"))
app = Celery("sizing", broker=url, backend=url)
app.conf.update(
    worker_hijack_root_logger=False,
    result_expires=3600,
    broker_transport_options=options,
    result_backend_transport_options=options,
)


@app.task(name="sizing.work")
def work(seconds=0.005):
    time.sleep(seconds)
    return seconds
"""

# A producer: one task, then idle; then a burst from THREADS threads; then idle again.
PRODUCER = """\
import sys, threading, time
from sizing_app import work
threads, count = int(sys.argv[1]), int(sys.argv[2])
work.delay()
print("idle", flush=True); time.sleep(6)
def burst():
    for _ in range(count // threads):
        work.delay()
workers = [threading.Thread(target=burst) for _ in range(threads)]
print("load", flush=True)
for t in workers: t.start()
for t in workers: t.join()
print("done", flush=True); time.sleep(3)
"""

# A web process: THREADS requests each waiting in get() for a task no worker runs yet.
WAITER = """\
import sys, threading, time
from sizing_app import work
threads = int(sys.argv[1])
def request():
    try:
        work.delay().get(timeout=15)
    except Exception:
        pass
workers = [threading.Thread(target=request) for _ in range(threads)]
for t in workers: t.start()
print("waiting", flush=True)
for t in workers: t.join()
"""


class Sampler:
    """Most sessions of the database seen at once, by application_name, per phase."""

    def __init__(self, db_url: str, everything: bool = False) -> None:
        self.db_url = db_url
        self.everything = everything
        self.phase = "start"
        self.count = 0  # samples taken: one transaction of its own each
        self.most: dict[str, collections.Counter[str]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            while not self.stop.is_set():
                if self.everything:  # behind PgBouncer: every server session is its
                    rows = conn.execute(
                        "SELECT 'via PgBouncer', count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        " AND application_name NOT LIKE 'bench-load%%'"
                    ).fetchall()
                else:
                    rows = conn.execute(
                        "SELECT application_name, count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        # '' is a session still logging in (its name comes with startup)
                        " AND application_name <> ''"
                        " AND application_name NOT LIKE 'bench-load%%'"
                        " GROUP BY 1"
                    ).fetchall()
                self.count += 1
                now = collections.Counter({str(name): int(n) for name, n in rows})
                now["total"] = sum(now.values())
                best = self.most.setdefault(self.phase, collections.Counter())
                if now["total"] >= best["total"]:
                    self.most[self.phase] = now
                time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def pgqueue(db_url: str, application_name: str | None = None) -> str:
    url = "pgqueue://" + db_url.split("://", 1)[1]
    return url + (f"?application_name={application_name}" if application_name else "")


def spawn(folder: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def wait_for_line(process: subprocess.Popen[str], word: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip() == word:
            return
    raise SystemExit(f"process ended before printing {word!r}")


def show(label: str, sampler: Sampler) -> None:
    parts = []
    for phase in ("idle", "load"):
        seen = sampler.most.get(phase, collections.Counter())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(seen.items()) if k != "total")
        parts.append(f"{phase} {seen['total']} ({detail})")
    print(f"{label}: " + "; ".join(parts), flush=True)


def worker_scenario(
    admin_url: str, folder: Path, pool: str, concurrency: int, tasks: int, bouncer: int | None
) -> None:
    with scratch(admin_url, "cpq_conn") as db_url:
        env = {**os.environ, "CPQ_URL": pgqueue(db_url), "PYTHONPATH": str(folder)}
        if bouncer is not None:
            env["CPQ_URL"] = pgqueue(via(db_url, bouncer))
            env["CPQ_OPTIONS"] = json.dumps(
                {"use_notify": False, "prepared_statements": False, "polling_interval": 0.2}
            )
        args = ["-m", "celery", "-A", "sizing_app", "worker", "-P", pool, "-l", "warning"]
        if pool != "solo":
            args += ["-c", str(concurrency)]
        with Sampler(db_url, everything=bouncer is not None) as sampler:
            process = spawn(folder, env, *args)
            try:
                time.sleep(8)  # start-up: consumers, mailboxes, first maintenance pass
                sampler.phase = "idle"
                time.sleep(5)
                load_env = {**env, "CPQ_URL": pgqueue(db_url, "bench-load"), "CPQ_OPTIONS": "{}"}
                sampler.phase = "load"
                publisher = spawn(folder, load_env, "-c", PRODUCER, "1", str(tasks))
                deadline = time.monotonic() + 120
                with psycopg.connect(
                    db_url, autocommit=True, application_name="bench-load"
                ) as conn:
                    while time.monotonic() < deadline:
                        row = conn.execute(
                            "SELECT count(*) FROM jobs WHERE payload->'headers'->>'task'"
                            " = 'sizing.work' AND status = 'completed'"
                        ).fetchone()
                        if row and row[0] >= tasks:
                            break
                        time.sleep(0.2)
                sampler.phase = "after"
                stop(publisher)
            finally:
                stop(process)
        name = "solo" if pool == "solo" else f"{pool} -c {concurrency}"
        route = ", through PgBouncer (transaction pooling): server sessions" if bouncer else ""
        show(f"worker {name}{route}", sampler)


def client_scenario(admin_url: str, folder: Path, kind: str, threads: int, tasks: int) -> None:
    with scratch(admin_url, "cpq_conn") as db_url:
        env = {**os.environ, "CPQ_URL": pgqueue(db_url), "PYTHONPATH": str(folder)}
        with Sampler(db_url) as sampler:
            if kind == "producer":
                process = spawn(folder, env, "-c", PRODUCER, str(threads), str(tasks))
                wait_for_line(process, "idle")
                sampler.phase = "idle"
                wait_for_line(process, "load")
                sampler.phase = "load"
                wait_for_line(process, "done")
                sampler.phase = "after"
                stop(process)
                show(f"producer, {threads} publishing thread(s)", sampler)
            else:
                process = spawn(folder, env, "-c", WAITER, str(threads))
                wait_for_line(process, "waiting")
                time.sleep(2)
                sampler.phase = "idle"
                time.sleep(4)
                sampler.phase = "after"
                stop(process)
                print(
                    f"web process, {threads} thread(s) waiting in get(): "
                    f"{sampler.most['idle']['total']} ("
                    + ", ".join(
                        f"{k} {v}" for k, v in sorted(sampler.most["idle"].items()) if k != "total"
                    )
                    + ")",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--only", choices=["workers", "clients"], help="run one half")
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="workers only, through a private PgBouncer in transaction pooling"
        " (use_notify and prepared_statements off); counts the server sessions",
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cpq-conn-"))
    (folder / "sizing_app.py").write_text(APP)
    with psycopg.connect(args.url) as conn:
        print(f"PostgreSQL {conn.info.server_version}; {args.tasks} tasks of 5 ms under load")
    try:
        scenarios(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def scenarios(args: argparse.Namespace, folder: Path) -> None:
    if args.pgbouncer:
        with pgbouncer(args.url, "transaction") as port:
            for pool, concurrency in (("threads", 8), ("prefork", 4), ("prefork", 8)):
                worker_scenario(args.url, folder, pool, concurrency, args.tasks, port)
        return
    if args.only != "workers":
        for threads in (1, 8):
            client_scenario(args.url, folder, "producer", threads, args.tasks)
        for threads in (1, 8):
            client_scenario(args.url, folder, "waiter", threads, args.tasks)
    if args.only != "clients":
        for pool, concurrency in (
            ("solo", 1),
            ("threads", 4),
            ("threads", 8),
            ("prefork", 2),
            ("prefork", 4),
            ("prefork", 8),
        ):
            worker_scenario(args.url, folder, pool, concurrency, args.tasks, None)


if __name__ == "__main__":
    main()
