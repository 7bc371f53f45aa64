#!/usr/bin/env python
"""Benchmark celery-pgqueue against Redis, RabbitMQ and Kombu's SQLAlchemy transport.

    python benchmarks/run.py                 # the full default run (15-20 min on 2 cores)
    python benchmarks/run.py --quick         # a smoke run, under 2 minutes
    python benchmarks/run.py --only pgqueue,redis --measures throughput --n 20000

Configurations run interleaved round by round on this machine, in one run; results are
appended to ``benchmarks/results/results.jsonl`` (one JSON line per measurement) and
the run's table is written to ``benchmarks/results/latest.md``. See
``benchmarks/README.md`` for what each measure means and the caveats.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from harness import measures, report, workers  # noqa: E402
from harness.provenance import harness_digest, machine, snapshot_source, versions  # noqa: E402
from harness.services import Configuration, Services  # noqa: E402

ALL_MEASURES = ("throughput", "latency", "memory", "backlog", "ceiling")

# Defaults sized so that the full run fits 25 minutes (15-20 measured) on a 2-core machine shared
# with its services (see README: 20,000 tasks x 6 configurations x 2 pools x 3 rounds
# would take well over an hour there). --quick: a smoke run under 2 minutes.
DEFAULTS: dict[str, tuple[Any, Any]] = {  # name: (full, quick)
    "n": (3_000, 150),
    "rounds": (3, 1),
    "pools": ("prefork,threads", "prefork"),
    "prefork_only": ("sqla-db", ""),
    "latency_pools": ("prefork", "prefork"),
    "latency_rate": (100.0, 50.0),
    "latency_duration": (10.0, 2.0),
    "latency_clients": (64, 16),
    "latency_warmup": (1.0, 0.2),
    "memory_pools": ("prefork", "prefork"),
    "memory_configs": ("pgqueue,redis,amqp-rpc", "pgqueue,redis,amqp-rpc,sqla-db"),
    "memory_n": (10_000, 150),
    "memory_wait": (20.0, 5.0),
    "backlog_levels": ("1000,100000,1000000", "100,2000"),
    "backlog_jobs": (10_000, 150),
    "backlog_cap": (6.0, 5.0),
    "ceiling_n": (3_000, 150),
    "measures": (",".join(ALL_MEASURES), ",".join(ALL_MEASURES)),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults are shown as full run / --quick.",
    )

    def opt(name: str, help_text: str, **kw: Any) -> None:
        full, quick = DEFAULTS[name.lstrip("-").replace("-", "_")]
        p.add_argument(name, help=f"{help_text} ({full} / {quick})", **kw)

    p.add_argument("--quick", action="store_true", help="tiny smoke run (under 2 minutes)")
    p.add_argument(
        "--only",
        help="comma list of configurations; a name also selects its '-' variants "
        "(pgqueue, pgqueue-noresult, pgqueue-async, redis, redis-noresult, amqp-rpc, sqla-db)",
    )
    opt("--measures", f"comma list of {', '.join(ALL_MEASURES)}")
    opt("--rounds", "rounds; configurations interleaved in each", type=int)
    opt("--n", "tasks published, then drained, per throughput measurement", type=int)
    opt("--pools", "worker pools for publish/drain: prefork (-c 2), threads (-c 4)")
    opt("--prefork-only", "configurations measured with the prefork pool only")
    opt("--latency-pools", "worker pools for the latency run")
    opt("--latency-rate", "tasks/s of the latency run", type=float)
    opt("--latency-duration", "seconds of the latency run", type=float)
    opt("--latency-clients", "producer threads in the latency run", type=int)
    opt("--latency-warmup", "first seconds of the latency run not counted", type=float)
    opt("--memory-pools", "worker pools for the memory measure")
    opt("--memory-configs", "configurations for the memory measure (one per broker)")
    opt("--memory-n", "countdown tasks for the memory measure", type=int)
    opt("--memory-wait", "most seconds to wait for the worker to take them", type=float)
    p.add_argument("--countdown", type=float, default=3600.0, help="seconds (3600)")
    opt("--backlog-levels", "filler rows of each backlog level")
    opt("--backlog-jobs", "jobs queued, then claimed, per level", type=int)
    opt("--backlog-cap", "seconds of claiming per level (the rest is extrapolated)", type=float)
    p.add_argument("--backlog-targets", default="pgqueue,sqla", help="(pgqueue,sqla)")
    opt("--ceiling-n", "jobs per raw-ceiling variant", type=int)
    p.add_argument("--ceiling-threads", default="1,2", help="(1,2)")
    p.add_argument("--ceiling-batch", default="1,8", help="claim limits (1,8)")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="seconds a drain may take before it is reported incomplete (300)",
    )
    p.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="admin URL of the PostgreSQL server; databases are created and dropped there "
        "($BENCH_PG_URL, else local 5432)",
    )
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--redis-db", type=int, default=11, help="must be empty; flushed after use")
    p.add_argument("--amqp-url", default="pyamqp://guest:guest@127.0.0.1:5672//")
    p.add_argument(
        "--source",
        type=Path,
        default=REPO,
        help="checkout whose celery_pgqueue is measured (default: this repository)",
    )
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="import celery_pgqueue and the harness in place, not from copies taken at start "
        "(the copies keep a long run immune to edits made meanwhile)",
    )
    p.add_argument("--output-dir", type=Path, default=HERE / "results")
    p.add_argument("--keep-workdir", action="store_true", help="keep worker logs and records")
    p.add_argument(
        "--render",
        metavar="RUN_ID",
        nargs="?",
        const="",
        help="only re-render latest.md from results.jsonl (the last run if no id)",
    )
    args = p.parse_args(argv)
    for key, (full, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


# -- the run ---------------------------------------------------------------------------


class Run:
    """One harness run: its id, work directory, results file and failure count."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"cpq-bench-{self.run_id}-"))
        self.results = args.output_dir / "results.jsonl"
        self.latest = args.output_dir / "latest.md"
        self.failures = 0
        self.started = time.monotonic()
        self.before_measure: Callable[[], Any] | None = None

    def log(self, text: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"[{stamp}] {text}", flush=True)

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        row = {"kind": kind, "run_id": self.run_id, **fields}
        report.append(self.results, row)
        return row

    def render(self) -> None:
        text = report.render(report.load(self.results, self.run_id))
        self.latest.parent.mkdir(parents=True, exist_ok=True)
        self.latest.write_text(text)

    def measure(
        self,
        round_: int,
        measure: str,
        config: str,
        pool: str | None,
        fn: Callable[[], dict[str, Any]],
    ) -> None:
        """Run one measurement; whatever happens, record it and kill what it started."""
        label = f"round {round_ + 1}: {measure} {config}{' ' + pool if pool else ''}"
        self.log(f"{label} ...")
        if self.before_measure is not None:
            self.before_measure()
        started = time.monotonic()
        load = measures.loadavg()
        cpu_before = _cpu_times()
        status, reason, metrics = "ok", None, None
        try:
            metrics = fn()
            if measure == "throughput" and not metrics.get("drain_complete"):
                status = "incomplete"
                reason = (
                    f"{metrics.get('completed')}/{metrics.get('n')} completed, "
                    f"{metrics.get('missing')} missing within the drain timeout"
                )
        except KeyboardInterrupt:
            raise
        except TimeoutError as exc:
            status, reason = "timeout", _short(exc)
        except Exception as exc:
            status, reason = "error", _short(exc)
            (self.workdir / f"error-{time.monotonic_ns()}.txt").write_text(traceback.format_exc())
        finally:
            workers.kill_all_children()
        elapsed = time.monotonic() - started
        if status != "ok":
            self.failures += 1
        self.record(
            "measurement",
            round=round_,
            measure=measure,
            config=config,
            pool=pool,
            status=status,
            reason=reason,
            metrics=metrics,
            elapsed_s=round(elapsed, 2),
            env={"loadavg": load, "cpu_busy_pct": _cpu_busy_since(cpu_before)},
            timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
        )
        self.log(
            f"{label}: {status} in {elapsed:.0f}s {_headline(measure, metrics)}"
            f"{' — ' + reason if reason else ''}"
        )


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 1500 else text[:1500] + "…"


def _cpu_times() -> Any:
    with contextlib.suppress(Exception):
        import psutil

        return psutil.cpu_times()
    return None


def _cpu_busy_since(before: Any) -> float | None:
    """Whole-machine CPU busy % since ``before``: how much else was running."""
    after = _cpu_times()
    if before is None or after is None:
        return None
    total = sum(after) - sum(before)
    idle = (after.idle + getattr(after, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
    return round(100.0 * (total - idle) / total, 1) if total > 0 else None


def _headline(measure: str, metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return ""
    try:
        if measure == "throughput":
            drain = metrics.get("drain_rate") or 0
            return f"publish {metrics['publish_rate']:.0f}/s, drain {drain:.0f}/s"
        if measure == "latency":
            start, get = metrics["start"], metrics.get("get") or {}
            text = f"start p50 {start['p50_ms']:.1f} ms p99 {start['p99_ms']:.1f} ms"
            return text + (f", get p50 {get['p50_ms']:.1f} ms" if get.get("p50_ms") else "")
        if measure == "memory":
            return (
                f"RSS {metrics['rss_before_mib']:.0f} -> {metrics['rss_after_mib']:.0f} MiB, "
                f"{metrics['taken_by_worker']} taken"
            )
        if measure in ("backlog", "ceiling"):
            return ", ".join(f"{k}: {v['rate']:.0f}/s" for k, v in metrics.items())
    except (KeyError, TypeError, ValueError):
        pass
    return ""


def select(configurations: dict[str, Configuration], only: str | None) -> list[Configuration]:
    if not only:
        return list(configurations.values())
    wanted = _names(only)

    def chosen(name: str) -> bool:
        return any(name == w or name.startswith(w + "-") for w in wanted)

    unknown = [
        w for w in wanted if not any(n == w or n.startswith(w + "-") for n in configurations)
    ]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {list(configurations)}")
    return [c for n, c in configurations.items() if chosen(n)]


def run_module(module: str, args: list[str], timeout: float) -> dict[str, Any]:
    """``python -m harness.<module> ARGS`` in a process group of its own; its JSON output."""
    config = Path(tempfile.gettempdir()) / "cpq-bench-empty-config.json"
    config.write_text("{}")
    process = subprocess.Popen(
        [sys.executable, "-m", f"harness.{module}", *args],
        cwd=workers.ROOT,
        env=workers.environment(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    workers.track(process.pid)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{module} still running after {timeout:.0f}s") from None
    finally:
        workers.reap(process)
    if process.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{err.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def _names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _family(name: str) -> str:
    return name.split("-")[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        rows = report.load(args.output_dir / "results.jsonl", args.render or None)
        if not rows:
            raise SystemExit("no such run in results.jsonl")
        (args.output_dir / "latest.md").write_text(report.render(rows))
        print(args.output_dir / "latest.md")
        return 0

    chosen = _names(args.measures)
    if set(chosen) - set(ALL_MEASURES):
        raise SystemExit(f"unknown measure(s) {sorted(set(chosen) - set(ALL_MEASURES))}")
    pools, latency_pools, memory_pools = (
        _names(args.pools),
        _names(args.latency_pools),
        _names(args.memory_pools),
    )
    all_pools = list(dict.fromkeys(pools + latency_pools + memory_pools))
    if set(all_pools) - set(measures.POOLS):
        raise SystemExit(f"pools are {list(measures.POOLS)}")
    prefork_only = set(_names(args.prefork_only))
    levels = sorted(int(x) for x in _names(args.backlog_levels))

    run = Run(args)
    source_dir, source = snapshot_source(args.source, run.workdir, not args.no_snapshot)
    if not args.no_snapshot:
        workers.use_copy(run.workdir)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(source_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    services = Services(
        args.pg_url,
        redis_host=args.redis_host,
        redis_port=args.redis_port,
        redis_db=args.redis_db,
        amqp_url=args.amqp_url,
    )
    run.before_measure = services.checkpoint
    configurations = select(services.configurations, args.only)
    ctx = measures.Context(
        run.workdir, services.queue, services.common(), settle=0.5 if args.quick else 2.0
    )

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    run.log(f"run {run.run_id}; workdir {run.workdir}; results -> {run.results}")
    try:
        available: list[Configuration] = []
        skipped: dict[str, str] = {}
        for configuration in configurations:
            reason = configuration.unavailable()
            if reason is None:
                try:
                    configuration.ensure()
                except Exception as exc:
                    reason = f"setup failed: {_short(exc)}"
            if reason:
                skipped[configuration.name] = reason
                run.log(f"skipping {configuration.name}: {reason}")
            else:
                available.append(configuration)
        families = {_family(c.name) for c in configurations}
        # Memory: one configuration per broker; a skipped one gives way to its sibling
        # (pgqueue without its result backend, say): the consumer holds ETA tasks alike.
        memory_set = set()
        for wanted in _names(args.memory_configs):
            pick = next((c.name for c in available if c.name == wanted), None) or next(
                (c.name for c in available if _family(c.name) == _family(wanted)), None
            )
            if pick:
                memory_set.add(pick)
        backlog_targets = [
            t for t in _names(args.backlog_targets) if t in families and "backlog" in chosen
        ]
        pg_reason = services.pgqueue_db.unavailable()
        if pg_reason:
            backlog_targets = []
        backlog_dbs = {
            t: [services.backlog_database(t, n) for n in levels] for t in backlog_targets
        }
        run.record(
            "run",
            started=datetime.datetime.now().isoformat(timespec="seconds"),
            rounds=args.rounds,
            quick=args.quick,
            config_order=[c.name for c in configurations],
            labels={c.name: c.label for c in services.configurations.values()},
            pools=all_pools,
            pool_args=[
                f"--pool {measures.POOLS[p][0]} -c {measures.POOLS[p][1]}" for p in all_pools
            ],
            measures=chosen,
            params={
                "checkpoint": services.checkpoint(),
                "n": args.n,
                "prefork_only": sorted(prefork_only),
                "latency_rate": args.latency_rate,
                "latency_duration": args.latency_duration,
                "latency_clients": args.latency_clients,
                "latency_warmup": args.latency_warmup,
                "memory_n": args.memory_n,
                "memory_wait": args.memory_wait,
                "countdown": args.countdown,
                "backlog_levels": levels,
                "backlog_jobs": args.backlog_jobs,
                "backlog_cap": args.backlog_cap,
                "ceiling_n": args.ceiling_n,
                "drain_timeout": args.drain_timeout,
            },
            machine=machine(),
            versions=versions(services, args.pg_url),
            source=source,
            harness_sha256=harness_digest(),
            databases=[s.database for s in services.all_services if hasattr(s, "database")],
            argv=sys.argv[1:] if argv is None else argv,
        )
        for name, reason in skipped.items():
            run.record("skipped", config=name, reason=reason)

        # Backlog levels: one database each, filled once for the whole run.
        backlog_urls: dict[str, list[str]] = {}
        for target, databases in backlog_dbs.items():
            specs = []
            for rows, database in zip(levels, databases, strict=True):
                specs += ["--level", f"{rows}={database.url}"]
            run.log(f"filling the {target} backlog levels {levels} ...")
            try:
                for database in databases:
                    database.ensure()
                filled = run_module("backlog", ["fill", target, *specs], timeout=1800)
                run.record("backlog_fill", config=target, metrics=filled)
                backlog_urls[target] = specs
            except Exception as exc:
                run.log(f"backlog fill for {target} failed: {_short(exc)}")
                run.record("skipped", config=f"backlog {target}", reason=_short(exc))

        for round_ in range(args.rounds):
            shift = round_ % max(1, len(available))
            for configuration in available[shift:] + available[:shift]:
                name = configuration.name
                for pool in all_pools:
                    tag = f"r{round_}-{name}-{pool}"
                    if pool != "prefork" and name in prefork_only:
                        continue
                    if "throughput" in chosen and pool in pools:
                        run.measure(
                            round_,
                            "throughput",
                            name,
                            pool,
                            lambda c=configuration, p=pool, t=tag, r=round_: measures.throughput(
                                ctx,
                                c,
                                p,
                                args.n,
                                f"{t}-tp",
                                drain_timeout=args.drain_timeout,
                                verify=r == 0,
                            ),
                        )
                    if "latency" in chosen and pool in latency_pools:
                        run.measure(
                            round_,
                            "latency",
                            name,
                            pool,
                            lambda c=configuration, p=pool, t=tag: measures.latency(
                                ctx,
                                c,
                                p,
                                f"{t}-lat",
                                rate=args.latency_rate,
                                duration=args.latency_duration,
                                clients=args.latency_clients,
                                warmup=args.latency_warmup,
                            ),
                        )
                    if "memory" in chosen and pool in memory_pools and name in memory_set:
                        run.measure(
                            round_,
                            "memory",
                            name,
                            pool,
                            lambda c=configuration, p=pool, t=tag: measures.memory(
                                ctx,
                                c,
                                p,
                                f"{t}-mem",
                                n=args.memory_n,
                                countdown=args.countdown,
                                max_wait=args.memory_wait,
                            ),
                        )
            if "ceiling" in chosen and "pgqueue" in families and not pg_reason:
                run.measure(
                    round_,
                    "ceiling",
                    "pgqueue",
                    None,
                    lambda: run_module(
                        "ceiling",
                        [
                            "--url",
                            services.pgqueue_db.url,
                            "--n",
                            str(args.ceiling_n),
                            "--threads",
                            args.ceiling_threads,
                            "--batch",
                            args.ceiling_batch,
                            "--handoff-n",
                            str(min(1000, args.ceiling_n)),
                            "--handoff-rate",
                            str(args.latency_rate),
                            *(
                                []
                                if services.redis.unavailable()
                                else ["--redis-url", services.redis.url]
                            ),
                        ],
                        timeout=900,
                    ),
                )
            for target, specs in backlog_urls.items():
                run.measure(
                    round_,
                    "backlog",
                    target,
                    None,
                    lambda t=target, s=specs: run_module(
                        "backlog",
                        [
                            "measure",
                            t,
                            *s,
                            "--jobs",
                            str(args.backlog_jobs),
                            "--time-cap",
                            str(args.backlog_cap),
                        ],
                        timeout=900,
                    ),
                )
            run.render()
            minutes = (time.monotonic() - run.started) / 60
            run.log(f"round {round_ + 1} done after {minutes:.1f} min; table in {run.latest}")
    except KeyboardInterrupt:
        run.log("interrupted; cleaning up")
        run.failures += 1
    finally:
        workers.kill_all_children()
        for error in services.teardown():
            run.log(f"teardown: {error}")
        with contextlib.suppress(Exception):
            run.render()
        if args.keep_workdir or run.failures:
            run.log(f"logs kept in {run.workdir}")
        else:
            shutil.rmtree(run.workdir, ignore_errors=True)
    minutes = (time.monotonic() - run.started) / 60
    run.log(f"done in {minutes:.1f} min: {run.latest}")
    return 0 if not run.failures else 1


if __name__ == "__main__":
    sys.exit(main())
