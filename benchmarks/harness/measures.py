"""The Celery measures: publish + drain, paced latency, worker memory under countdown.

Each function runs one measurement of one configuration and pool, from an emptied
broker, and returns a metrics dict. Workers are always stopped (warm shutdown, then
SIGKILL of the process group) before it returns or raises.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.services import Configuration
from harness.stats import summary_ms
from harness.workers import Worker, run_producer

POOLS = {"prefork": ("prefork", 2), "threads": ("threads", 4)}


@dataclass
class Context:
    """What every measurement needs: where to write, which queue, the common Celery conf."""

    workdir: Path
    queue: str
    common: dict[str, Any]
    settle: float = 2.0
    """Seconds a fresh worker idles before the memory measure (and after publishing)."""
    worker_ready_timeout: float = 90.0

    def config_file(self, configuration: Configuration, tag: str) -> Path:
        path = self.workdir / f"config-{configuration.name}-{tag}.json"
        path.write_text(json.dumps({**self.common, **configuration.conf()}, indent=1))
        return path

    def subdir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def _parse(lines: list[str]) -> list[tuple[str, float | None, float, float]]:
    parsed = []
    for line in lines:
        task_id, published, start, end = line.split()
        parsed.append(
            (task_id, None if published == "-" else float(published), float(start), float(end))
        )
    return parsed


def _start_worker(
    ctx: Context,
    configuration: Configuration,
    config_file: Path,
    pool: str,
    tag: str,
    wrap: tuple[str, ...] = (),
) -> Worker:
    kind, concurrency = POOLS[pool]
    worker = Worker(ctx.subdir(tag), config_file, kind, concurrency, ctx.queue, name=tag, wrap=wrap)
    try:
        worker.wait_ready(ctx.worker_ready_timeout)
    except BaseException:
        worker.stop()
        raise
    return worker


def throughput(
    ctx: Context,
    configuration: Configuration,
    pool: str,
    n: int,
    tag: str,
    *,
    drain_timeout: float,
    verify_sample: int = 20,
    verify: bool = True,
    worker_wrap: tuple[str, ...] = (),
    producer_wrap: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Publish ``n`` tasks from one producer, then start a worker and time the drain.

    Drain rate: ``n`` / (last task end - first task start), from the workers' records,
    so the worker's start-up is not counted. Every published id must be in the records.
    """
    configuration.reset()
    config_file = ctx.config_file(configuration, tag)
    work = ctx.subdir(tag)
    ids_file = work / "ids.txt"
    published = run_producer(
        work,
        config_file,
        ["publish", "--n", str(n), "--ids", str(ids_file)],
        timeout=120 + n / 20,
        wrap=producer_wrap,
    )
    depth = configuration.depth()
    ids = [line for line in ids_file.read_text().split() if line]
    spawned = time.monotonic()
    worker = _start_worker(ctx, configuration, config_file, pool, tag, worker_wrap)
    ready_s = time.monotonic() - spawned
    try:
        lines, complete = worker.wait_records(n, drain_timeout)
        pids = [worker.pid, *worker.child_pids()]
    finally:
        worker.stop()
        configuration.after_producer(published)
    records = _parse(lines)
    seen = Counter(r[0] for r in records)
    expected = set(ids)
    missing = len(expected - seen.keys())
    duplicates = sum(c - 1 for c in seen.values() if c > 1)
    unexpected = len(seen.keys() - expected)
    first = min((r[2] for r in records), default=None)
    last = max((r[3] for r in records), default=None)
    span = (last - first) if first is not None and last is not None else None
    metrics: dict[str, Any] = {
        "n": n,
        "publish_rate": published["rate"],
        "publish_seconds": published["seconds"],
        "depth_after_publish": depth,
        "worker_ready_seconds": ready_s,
        "completed": len(seen.keys() & expected),
        "missing": missing,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "drain_seconds": span,
        "drain_rate": (len(seen.keys() & expected) / span) if span else None,
        "drain_complete": complete and missing == 0,
        "worker_pids": pids,
    }
    # rpc:// results go to the publishing process only: nobody else can read them.
    if verify and configuration.results and complete and "rpc" not in configuration.name:
        try:
            metrics["verify"] = run_producer(
                work,
                config_file,
                ["verify", "--ids", str(ids_file), "--sample", str(verify_sample)],
                timeout=60,
            )
        except Exception as exc:  # verification is a sanity check, not the measure
            metrics["verify"] = {"error": str(exc)[:300]}
    return metrics


def latency(
    ctx: Context,
    configuration: Configuration,
    pool: str,
    tag: str,
    *,
    rate: float,
    duration: float,
    clients: int,
    warmup: float,
    get_timeout: float = 30.0,
) -> dict[str, Any]:
    """A steady ``rate`` for ``duration`` seconds against a running worker.

    publish -> start: the worker's ``task_prerun`` time minus the ``time.time()`` the
    producer passed as the task's argument just before ``delay()`` (one machine, one
    clock). publish -> get(): when ``get()`` returned, same origin. Tasks published in
    the first ``warmup`` seconds are not counted.
    """
    configuration.reset()
    config_file = ctx.config_file(configuration, tag)
    work = ctx.subdir(tag)
    worker = _start_worker(ctx, configuration, config_file, pool, tag)
    produced: dict[str, Any] = {}
    try:
        time.sleep(0.5)
        out = work / "paced.jsonl"
        args = [
            "paced", "--rate", str(rate), "--duration", str(duration), "--clients",
            str(clients), "--out", str(out), "--timeout", str(get_timeout),
        ]  # fmt: skip
        if configuration.results:
            args.append("--get")
        produced = run_producer(work, config_file, args, timeout=duration + get_timeout + 90)
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        lines, complete = worker.wait_records(len(rows), 60)
    finally:
        worker.stop()
        configuration.after_producer(produced)
    started = {r[0]: r[2] for r in _parse(lines)}
    skip_before = warmup * rate
    counted = [r for r in rows if r["i"] >= skip_before]
    start_lat = [started[r["id"]] - r["published"] for r in counted if r["id"] in started]
    get_lat = [r["got"] - r["published"] for r in counted if r.get("got") is not None]
    pubs = sorted(r["published"] for r in counted)
    achieved = (len(pubs) - 1) / (pubs[-1] - pubs[0]) if len(pubs) > 1 else None
    return {
        "rate": rate,
        "duration": duration,
        "clients": clients,
        "published": len(rows),
        "planned": produced.get("planned"),
        "errors": produced.get("error_count"),
        "error_samples": produced.get("errors"),
        "achieved_rate": achieved,
        "records_complete": complete,
        "start": summary_ms(start_lat),
        "get": summary_ms(get_lat) if configuration.results else None,
        "publish_call": summary_ms([r["sent"] - r["published"] for r in counted]),
    }


def memory(
    ctx: Context,
    configuration: Configuration,
    pool: str,
    tag: str,
    *,
    n: int,
    countdown: float,
    max_wait: float = 30.0,
) -> dict[str, Any]:
    """Worker RSS (main process + pool children) before and after ``n`` countdown tasks.

    "After" is taken once the broker has nothing due left for the worker to fetch and
    the RSS has stopped moving (two samples 0.5 s apart within 1 MiB), or after
    ``max_wait``. ``taken`` is how many of the tasks the worker had fetched by then:
    RabbitMQ hands ETA tasks over as the worker raises its prefetch, one at a time.
    """
    configuration.reset()
    config_file = ctx.config_file(configuration, tag)
    work = ctx.subdir(tag)
    settle = ctx.settle
    worker = _start_worker(ctx, configuration, config_file, pool, tag)
    produced: dict[str, Any] = {}
    try:
        time.sleep(settle)
        before = _memory(worker)
        produced = run_producer(
            work,
            config_file,
            [
                "publish",
                "--n",
                str(n),
                "--ids",
                str(work / "ids.txt"),
                "--countdown",
                str(countdown),
            ],
            timeout=120 + n / 20,
        )
        waited_from = time.monotonic()
        time.sleep(settle)
        previous = worker.rss()
        depth = configuration.depth()
        while time.monotonic() - waited_from < max_wait:
            time.sleep(0.5)
            depth = configuration.depth()
            current = worker.rss()
            if depth == 0 and abs(current - previous) < 1 << 20:
                break
            previous = current
        after = _memory(worker)
        waited = time.monotonic() - waited_from
        waiting = (configuration.waiting or configuration.depth)()
        if not worker.alive():
            raise RuntimeError(f"worker died during the memory measure:\n{worker.log_tail()}")
    finally:
        worker.stop()
        configuration.after_producer(produced)
    return {
        "n": n,
        "countdown": countdown,
        "publish_rate": produced["rate"],
        "depth_when_measured": depth,
        "taken_by_worker": n - waiting,
        "waited_seconds": waited,
        "rss_before_mib": before["rss"] / 2**20,
        "rss_after_mib": after["rss"] / 2**20,
        "rss_delta_mib": (after["rss"] - before["rss"]) / 2**20,
        "pss_before_mib": before["pss"] / 2**20 if before["pss"] is not None else None,
        "pss_after_mib": after["pss"] / 2**20 if after["pss"] is not None else None,
        "processes": after["processes"],
        "main_rss_delta_mib": (after["main"] - before["main"]) / 2**20,
    }


def _memory(worker: Worker) -> dict[str, Any]:
    import psutil

    rss = 0
    pss: int | None = 0
    main = 0
    processes = 0
    for proc in worker.tree():
        try:
            info = proc.memory_info()
        except psutil.NoSuchProcess:
            continue
        processes += 1
        rss += info.rss
        if proc.pid == worker.pid:
            main = info.rss
        if pss is not None:
            try:
                pss += proc.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError, psutil.NoSuchProcess):
                pss = None
    return {"rss": rss, "pss": pss, "main": main, "processes": processes}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
