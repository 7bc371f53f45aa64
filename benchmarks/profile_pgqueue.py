#!/usr/bin/env python
"""Where pgqueue's time goes: py-spy on the producer and the worker, pg_stat_statements.

    python benchmarks/profile_pgqueue.py                # embedded PostgreSQL, N=3000
    python benchmarks/profile_pgqueue.py --n 5000 --configs pgqueue-noresult

pg_stat_statements must be preloaded, which needs a server restart; this never touches
the machine's PostgreSQL. It starts a private server instead
(``celery_pgqueue.devserver.EmbeddedPostgres`` with ``shared_preload_libraries``; its
speed settings are the devserver's: ``fsync=off``, ``synchronous_commit=off``), or uses
``--pg-url`` if you point it at a server that already preloads the extension.

For each configuration, three phases against an emptied database:

publish  ``noop.delay()`` N times from one producer, run under ``py-spy record``;
drain    a prefork -c 2 worker drains the N tasks; ``py-spy record --subprocesses`` is
         attached while the queue is paused, and the queue resumed once it samples;
paced    50 tasks/s for 5 s with ``get()`` (configurations with results): statements
         per task including the client's wait for its result.

Writes ``<out>/profile.md`` (top functions, time by package, statements per task) and
the raw py-spy stacks and pg_stat_statements rows next to it. Needs ``py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import psycopg  # noqa: E402
from harness import measures  # noqa: E402
from harness.provenance import snapshot_source, versions  # noqa: E402
from harness.services import Services  # noqa: E402
from harness.workers import Worker, kill_all_children, reap, run_producer, track  # noqa: E402

STATEMENTS = """
SELECT s.query, s.calls, s.total_exec_time, s.rows
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = %s ORDER BY s.calls DESC, s.total_exec_time DESC
"""
XACTS = "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s"


# -- py-spy stacks -----------------------------------------------------------------------


def parse_stacks(path: Path) -> list[tuple[int, list[str], int]]:
    """(process depth, frames root->leaf, samples) from py-spy's raw (collapsed) output."""
    stacks = []
    if not path.exists():
        return stacks
    for line in path.read_text(errors="replace").splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        parts = body.split(";")
        depth = sum(1 for p in parts if p.startswith("process "))
        frames = [p for p in parts if not p.startswith("process ") and not p.startswith("thread ")]
        stacks.append((depth, frames, int(count)))
    return stacks


def _package(frame: str) -> str:
    location = frame[frame.rfind("(") + 1 : -1] if frame.endswith(")") else ""
    file = location.rsplit(":", 1)[0]
    for name in (
        "celery_pgqueue",
        "sqlalchemy",
        "psycopg_pool",
        "psycopg",
        "kombu",
        "celery",
        "billiard",
        "vine",
        "amqp",
        "harness",
        "json",
        "uuid",
        "threading",
        "selectors",
        "socket",
        "logging",
    ):
        if file.startswith(name + "/") or f"/{name}/" in file or file.startswith(name + "."):
            return name
    return "other (stdlib/interpreter)"


def summarise(stacks: list[tuple[int, list[str], int]], top: int = 25) -> dict[str, Any]:
    total = sum(c for _, _, c in stacks) or 1
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    for _, frames, count in stacks:
        if not frames:
            continue
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    interesting = (
        "celery_pgqueue",
        "sqlalchemy",
        "psycopg",
        "kombu",
        "celery",
        "billiard",
        "json",
        "harness",
    )
    return {
        "samples": total,
        "self": [(f, c / total) for f, c in own.most_common(top)],
        # Frames on (nearly) every stack are the process's entry points: they say nothing.
        "inclusive": [
            (f, c / total)
            for f, c in inclusive.most_common(400)
            if _package(f) in interesting and c / total < 0.8
        ][:top],
        "packages": [(p, c / total) for p, c in packages.most_common()],
    }


# -- statements --------------------------------------------------------------------------


def statements(url: str, database: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(STATEMENTS, (database,)).fetchall()
    return [
        {"query": " ".join(q.split()), "calls": c, "ms": t, "rows": r}
        for q, c, t, r in rows
        if "pg_stat_statements" not in q and "pg_stat_database" not in q
    ]


def reset_stats(url: str) -> tuple[int, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
        conn.execute("SELECT pg_stat_clear_snapshot()")
    return xacts(url)


def xacts(url: str) -> tuple[int, int]:
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(XACTS, (database,)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


# -- phases ------------------------------------------------------------------------------


def profile(args: argparse.Namespace, admin_url: str, out: Path, workdir: Path) -> dict[str, Any]:
    services = Services(admin_url)
    database = services.pgqueue_db
    results: dict[str, Any] = {"versions": versions(services, admin_url), "configs": {}}
    ctx = measures.Context(workdir, services.queue, {**services.common(), **args.conf})
    try:
        for name in args.configs.split(","):
            configuration = services.configurations[name]
            reason = configuration.unavailable()
            if reason:
                results["configs"][name] = {"skipped": reason}
                continue
            configuration.ensure()
            database.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            results["configs"][name] = run_config(args, ctx, configuration, database, out)
    finally:
        kill_all_children()
        services.teardown()
    return results


def _phase(url: str, db: str, before: tuple[int, int], n: int) -> dict[str, Any]:
    time.sleep(1.5)  # backends report transaction counts to pg_stat_database lazily
    after = xacts(url)
    rows = statements(url, db)
    return {
        "tasks": n,
        "statements": rows,
        "statements_per_task": sum(r["calls"] for r in rows) / n if n else None,
        "db_ms_per_task": sum(r["ms"] for r in rows) / n if n else None,
        "transactions_per_task": (after[0] - before[0]) / n if n else None,
    }


def run_config(
    args: argparse.Namespace, ctx: measures.Context, configuration: Any, database: Any, out: Path
) -> dict[str, Any]:
    name = configuration.name
    url, db = database.url, database.database
    config_file = ctx.config_file(configuration, f"profile-{name}")
    work = ctx.subdir(f"profile-{name}")
    report: dict[str, Any] = {}
    spy = ["py-spy", "record", "--format", "raw", "--rate", str(args.rate), "--nonblocking"]

    # publish, under py-spy
    configuration.reset()
    before = reset_stats(url)
    producer_stacks = out / f"{name}-producer.txt"
    published = run_producer(
        work,
        config_file,
        ["publish", "--n", str(args.n), "--ids", str(work / "ids.txt")],
        timeout=600,
        wrap=(*spy, "-o", str(producer_stacks), "--"),
    )
    report["publish"] = {**_phase(url, db, before, args.n), "rate": published.get("rate")}
    report["publish"]["profile"] = summarise(parse_stacks(producer_stacks))

    # drain: pause, start the worker, attach py-spy, resume
    database.execute(f"UPDATE job_queues SET is_active = false WHERE name = '{ctx.queue}'")
    worker = Worker(work, config_file, "prefork", 2, ctx.queue, name=f"profile-{name}")
    worker_stacks = out / f"{name}-worker.txt"
    try:
        worker.wait_ready(90)
        time.sleep(1.0)
        recorder = subprocess.Popen(
            [*spy, "--subprocesses", "--pid", str(worker.pid), "-o", str(worker_stacks)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        track(recorder.pid)
        time.sleep(1.5)
        before = reset_stats(url)
        started = time.monotonic()
        database.execute(
            f"UPDATE job_queues SET is_active = true WHERE name = '{ctx.queue}'",
            f"SELECT pg_notify('celery_pgqueue_public', '{ctx.queue}')",
        )
        _, complete = worker.wait_records(args.n, 600)
        seconds = time.monotonic() - started
        drain = _phase(url, db, before, args.n)
        recorder.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            recorder.wait(60)
        reap(recorder)
    finally:
        worker.stop()
    records = [line.split() for line in worker.records()]
    first = min(float(r[2]) for r in records)
    last = max(float(r[3]) for r in records)
    drain["rate"] = len(records) / (last - first)
    drain["complete"] = complete
    drain["wall_seconds"] = seconds
    stacks = parse_stacks(worker_stacks)
    drain["profile_main"] = summarise([s for s in stacks if s[0] <= 1])
    drain["profile_children"] = summarise([s for s in stacks if s[0] >= 2])
    report["drain"] = drain

    # paced with get(): statements per task for a client that waits for results
    if configuration.results:
        configuration.reset()
        worker = Worker(work, config_file, "prefork", 2, ctx.queue, name=f"paced-{name}")
        try:
            worker.wait_ready(90)
            before = reset_stats(url)
            produced = run_producer(
                work,
                config_file,
                [
                    "paced",
                    "--rate",
                    "50",
                    "--duration",
                    "5",
                    "--clients",
                    "8",
                    "--get",
                    "--out",
                    str(work / "paced.jsonl"),
                ],
                timeout=120,
            )
            worker.wait_records(int(produced["tasks"]), 60)
            report["paced"] = _phase(url, db, before, int(produced["tasks"]))
        finally:
            worker.stop()
    return report


# -- report ------------------------------------------------------------------------------


def render(results: dict[str, Any], header: dict[str, Any]) -> str:
    out: list[str] = []
    w = out.append
    w(f"# pgqueue profile — {header['started']}")
    w("")
    w(
        f"Server: {header['server']}. Source: {json.dumps(header['source'])}. "
        f"N = {header['n']:,}; py-spy at {header['rate']} Hz (samples of running threads; "
        "a thread blocked inside libpq or a pipe read still counts). Extra Celery settings: "
        f"{json.dumps(header.get('conf') or {})}."
    )
    w("")
    for name, report in results["configs"].items():
        w(f"## {name}")
        w("")
        if "skipped" in report:
            w(f"Skipped: {report['skipped']}")
            w("")
            continue
        for phase in ("publish", "drain", "paced"):
            data = report.get(phase)
            if not data:
                continue
            rate = f", {data['rate']:,.0f} tasks/s" if data.get("rate") else ""
            w(f"### {phase}{rate}")
            w("")
            w(
                f"Per task: {data['statements_per_task']:.2f} statements (round trips), "
                f"{data['transactions_per_task']:.2f} committed transactions, "
                f"{data['db_ms_per_task']:.3f} ms executing in PostgreSQL."
            )
            w("")
            w("| calls/task | ms/call | rows/call | statement |")
            w("|---:|---:|---:|---|")
            for row in data["statements"][:15]:
                per = row["calls"] / data["tasks"]
                if per < 0.005:
                    continue
                query = row["query"]
                query = query if len(query) <= 160 else query[:157] + "…"
                w(
                    f"| {per:.2f} | {row['ms'] / row['calls']:.3f} | "
                    f"{row['rows'] / row['calls']:.2f} | `{query}` |"
                )
            w("")
            for key, title in (
                ("profile", "producer"),
                ("profile_main", "worker main process"),
                ("profile_children", "worker pool children"),
            ):
                prof = data.get(key)
                if not prof or prof["samples"] <= 1:
                    continue
                w(
                    f"**{title}** ({prof['samples']:,} samples). Time by package (leaf frame): "
                    + ", ".join(f"{p} {s:.0%}" for p, s in prof["packages"][:8])
                    + "."
                )
                w("")
                w("| inclusive | function |")
                w("|---:|---|")
                for frame, share in prof["inclusive"][:20]:
                    w(f"| {share:.0%} | `{frame}` |")
                w("")
                w("| self | function |")
                w("|---:|---|")
                for frame, share in prof["self"][:12]:
                    w(f"| {share:.0%} | `{frame}` |")
                w("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--configs", default="pgqueue,pgqueue-noresult")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument(
        "--pg-url",
        help="admin URL of a server preloading pg_stat_statements (default: start an embedded one)",
    )
    parser.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra Celery setting for producer and worker, e.g. "
        "worker_enable_remote_control=false (repeatable)",
    )
    parser.add_argument("--source", type=Path, default=HERE.parent)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "profile")
    args = parser.parse_args(argv)
    args.conf = {k: json.loads(v) for k, _, v in (c.partition("=") for c in args.conf)}
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cpq-profile-"))
    source_dir, source = snapshot_source(args.source, workdir, True)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(source_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    server = None
    try:
        if args.pg_url:
            admin_url = args.pg_url
            label = args.pg_url
        else:
            sys.path.insert(0, str(source_dir))
            from celery_pgqueue.devserver import EmbeddedPostgres

            server = EmbeddedPostgres(
                settings={
                    "shared_preload_libraries": "pg_stat_statements",
                    "pg_stat_statements.track_utility": "on",
                }
            )
            server.start()
            admin_url = server.url()
            label = "embedded PostgreSQL (devserver settings: fsync=off, synchronous_commit=off)"
        header = {
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "server": label,
            "source": source,
            "n": args.n,
            "rate": args.rate,
            "conf": args.conf,
        }
        results = profile(args, admin_url, args.out, workdir)
        (args.out / "profile.json").write_text(
            json.dumps({**header, **results}, indent=1, default=str)
        )
        (args.out / "profile.md").write_text(render(results, header))
        print(args.out / "profile.md")
    finally:
        kill_all_children()
        if server is not None:
            server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
