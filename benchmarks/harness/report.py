"""Results: one JSON line per measurement (appended), and a Markdown table per run.

Every row of ``results.jsonl`` carries the run id, so a table can be rebuilt from the
file at any time (``run.py --render RUN_ID``). Cells are the median over rounds with
the min-max range; ratios to Redis are taken within each round (same pool) first, then
summarised the same way, so slow drift of the machine cancels out of them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from harness.stats import spread

REFERENCE = "redis"
TIMES = "\u00d7"  # the multiplication sign, for ratios


def append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def load(path: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if run_id is None and rows:
        run_id = rows[-1].get("run_id")
    return [r for r in rows if r.get("run_id") == run_id]


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "\u2013"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def cell(values: Iterable[float | None], digits: int = 0, suffix: str = "") -> str:
    found = spread(list(values))
    if found is None:
        return "\u2013"
    median, low, high, n = found
    text = f"{_fmt(median, digits)}{suffix}"
    if n > 1:
        text += f" ({_fmt(low, digits)}\u2013{_fmt(high, digits)})"
    return text


def _get(metrics: dict[str, Any] | None, path: str) -> float | None:
    value: Any = metrics
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value if isinstance(value, (int, float)) else None


class Table:
    """The measurements of one run, indexed for rendering."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.header = next((r for r in records if r.get("kind") == "run"), {})
        self.rows = [r for r in records if r.get("kind") == "measurement"]
        self.skipped = [r for r in records if r.get("kind") == "skipped"]
        self.by: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
        for row in self.rows:
            self.by[(row["measure"], row["config"], row.get("pool") or "")].append(row)

    def configs(self, measure: str) -> list[tuple[str, str]]:
        order = self.header.get("config_order") or []
        pools = self.header.get("pools") or []
        keys = {(c, p) for (m, c, p) in self.by if m == measure}

        def rank(key: tuple[str, str]) -> tuple[int, int, str]:
            c, p = key
            return (
                order.index(c) if c in order else 99,
                pools.index(p) if p in pools else 99,
                c,
            )

        return sorted(keys, key=rank)

    def ok(self, measure: str, config: str, pool: str) -> list[dict[str, Any]]:
        return [r for r in self.by[(measure, config, pool)] if r["status"] == "ok"]

    def values(self, measure: str, config: str, pool: str, path: str) -> list[float | None]:
        return [_get(r["metrics"], path) for r in self.ok(measure, config, pool)]

    def ratios(
        self, measure: str, config: str, pool: str, path: str, invert: bool = False
    ) -> list[float | None]:
        reference = {
            r["round"]: _get(r["metrics"], path) for r in self.ok(measure, REFERENCE, pool)
        }
        out: list[float | None] = []
        for row in self.ok(measure, config, pool):
            mine = _get(row["metrics"], path)
            ref = reference.get(row["round"])
            if mine is None or not ref:
                continue
            out.append((ref / mine) if invert else (mine / ref))
        return out

    def status_note(self, measure: str, config: str, pool: str) -> str:
        bad = [r for r in self.by[(measure, config, pool)] if r["status"] != "ok"]
        if not bad:
            return ""
        kinds = sorted({r["status"] for r in bad})
        return f" ⚠ {len(bad)} {'/'.join(kinds)}"


def _label(table: Table, config: str) -> str:
    labels = table.header.get("labels") or {}
    return labels.get(config, config)


def render(records: list[dict[str, Any]]) -> str:
    table = Table(records)
    h = table.header
    out: list[str] = []
    w = out.append
    w(f"# Benchmark results — run {h.get('run_id', '?')}")
    w("")
    w(
        f"{h.get('started', '?')}; {h.get('rounds', '?')} round(s), configurations interleaved "
        "round by round (order rotated each round). Cells: median over rounds (min\u2013max). "
        "\u00d7Redis: ratio to *Redis broker + Redis backend* with the same pool in the same "
        "round, then median (min\u2013max) of those ratios; for rates >1 is faster than Redis, for "
        "latencies and memory >1 is more than Redis."
    )
    w("")
    machine = h.get("machine") or {}
    versions = h.get("versions") or {}
    source = h.get("source") or {}
    loads = [r["env"]["loadavg"][0] for r in table.rows if (r.get("env") or {}).get("loadavg")]
    busy = [
        r["env"]["cpu_busy_pct"]
        for r in table.rows
        if (r.get("env") or {}).get("cpu_busy_pct") is not None
    ]
    load_text = f"{min(loads):.1f}\u2013{max(loads):.1f}" if loads else "?"
    busy_text = f", whole-machine CPU busy {cell(busy)}% per measurement" if busy else ""
    w(
        f"- Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('memory_gib', '?')} GiB RAM, {machine.get('platform', '?')}; "
        f"1-min load average at measurement starts {load_text}{busy_text}"
    )
    w("- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    w(
        f"- celery-pgqueue source: commit {source.get('commit', '?')}"
        f"{' + uncommitted changes' if source.get('dirty') else ''} "
        f"(package files sha256 {str(source.get('sha256', '?'))[:12]})"
    )
    params = h.get("params") or {}
    w(
        "- Workers: `celery worker` subprocesses, "
        + ", ".join(f"`{p}`" for p in h.get("pool_args", []))
        + "; `--without-heartbeat --without-gossip --without-mingle`, log level WARNING, "
        "default prefetch (4 per process), early ack."
    )
    if params.get("checkpoint"):
        w(
            "- Before every measurement, whatever the broker: PostgreSQL `CHECKPOINT`, so "
            "no measurement waits on flushing the harness's own earlier writes."
        )
    w("")
    if table.skipped:
        w(
            "**Skipped:** "
            + "; ".join(
                f"{s['config']} ({s.get('reason', '?')})" for s in _unique_skips(table.skipped)
            )
        )
        w("")

    # -- throughput
    if table.configs("throughput"):
        w(f"## Publish and drain (N = {params.get('n', '?'):,} tasks)")
        w("")
        w(
            "Publish: `noop.delay(time.time())` in a loop from one producer process. Drain: "
            "the worker starts after the backlog exists; tasks/s from the first task's start "
            "to the last task's end, every published id accounted for."
        )
        w("")
        if params.get("prefork_only"):
            w(f"Prefork pool only (to keep the run short): {', '.join(params['prefork_only'])}.")
            w("")
        w("| configuration | pool | publish tasks/s | \u00d7Redis | drain tasks/s | \u00d7Redis |")
        w("|---|---|---:|---:|---:|---:|")
        for config, pool in table.configs("throughput"):
            m = "throughput"
            w(
                f"| {_label(table, config)}{table.status_note(m, config, pool)} | {pool} | "
                f"{cell(table.values(m, config, pool, 'publish_rate'))} | "
                f"{cell(table.ratios(m, config, pool, 'publish_rate'), 2, TIMES)} | "
                f"{cell(table.values(m, config, pool, 'drain_rate'))} | "
                f"{cell(table.ratios(m, config, pool, 'drain_rate'), 2, TIMES)} |"
            )
        w("")

    # -- latency
    if table.configs("latency"):
        w(
            f"## Latency at a steady {params.get('latency_rate', '?')} tasks/s for "
            f"{params.get('latency_duration', '?')} s"
        )
        w("")
        w(
            "publish → start: the task's `task_prerun` time minus the `time.time()` passed "
            "as its argument just before `delay()`. publish → get(): until `get()` returned "
            f"in the publishing thread ({params.get('latency_clients', '?')} client threads "
            f"share one schedule). First {params.get('latency_warmup', '?')} s not counted. "
            "Milliseconds."
        )
        w("")
        w(
            "| configuration | pool | start p50 | start p95 | start p99 | start max | "
            "get p50 | get p95 | get p99 | \u00d7Redis (start p50) | achieved tasks/s |"
        )
        w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for config, pool in table.configs("latency"):
            m = "latency"

            def v(path: str, digits: int = 1, c: str = config, p: str = pool) -> str:
                return cell(table.values("latency", c, p, path), digits)

            w(
                f"| {_label(table, config)}{table.status_note(m, config, pool)} | {pool} | "
                f"{v('start.p50_ms')} | {v('start.p95_ms')} | {v('start.p99_ms')} | "
                f"{v('start.max_ms')} | {v('get.p50_ms')} | {v('get.p95_ms')} | "
                f"{v('get.p99_ms')} | "
                f"{cell(table.ratios(m, config, pool, 'start.p50_ms'), 2, TIMES)} | "
                f"{v('achieved_rate', 0)} |"
            )
        w("")

    # -- memory
    if table.configs("memory"):
        w(
            f"## Worker memory with {params.get('memory_n', 0):,} tasks at countdown="
            f"{params.get('countdown', '?')}"
        )
        w("")
        w(
            "RSS of the worker's main process plus its pool children (psutil), in MiB: "
            "before publishing, and once the broker had nothing due left for the worker and "
            f"the RSS had stopped moving (at most {params.get('memory_wait', '?')} s after "
            "publishing). *Taken*: how many of the tasks the worker had fetched by then (a "
            "pgqueue worker fetches none: they wait in the table until due). Summed RSS "
            "counts pages shared by prefork children more than once; the delta is what "
            "matters."
        )
        w("")
        w("| configuration | pool | RSS before | RSS after | delta | taken by worker |")
        w("|---|---|---:|---:|---:|---:|")
        for config, pool in table.configs("memory"):
            m = "memory"
            w(
                f"| {_label(table, config)}{table.status_note(m, config, pool)} | {pool} | "
                f"{cell(table.values(m, config, pool, 'rss_before_mib'), 1)} | "
                f"{cell(table.values(m, config, pool, 'rss_after_mib'), 1)} | "
                f"{cell(table.values(m, config, pool, 'rss_delta_mib'), 1)} | "
                f"{cell(table.values(m, config, pool, 'taken_by_worker'))} |"
            )
        w("")

    # -- backlog
    backlog = [r for r in table.rows if r["measure"] == "backlog" and r["status"] == "ok"]
    if backlog or any(r["measure"] == "backlog" for r in table.rows):
        jobs = params.get("backlog_jobs", 0)
        w(f"## Claim cost against the table's size ({jobs:,} jobs claimed and completed)")
        w("")
        w(
            "Without Celery: one claim (limit 1) and one completion per job, single thread. "
            "Each level is a database of its own, filled once per run with `generate_series` "
            "rows (then VACUUM ANALYZE): for pgqueue a third each of same-queue jobs scheduled "
            "30 days ahead, due jobs of another queue and completed history; for Kombu's "
            "SQLAlchemy transport half visible messages of another queue and half consumed "
            f"messages (it never deletes them). Each round queues {jobs:,} fresh jobs per "
            f"level and claims for at most {params.get('backlog_cap', '?')} s; the time for "
            f"all {jobs:,} is extrapolated from that rate (marked \u2020). Cells: seconds per "
            f"{jobs:,} jobs, median (min\u2013max); then the median jobs/s."
        )
        w("")
        levels = [str(x) for x in params.get("backlog_levels", [])]
        w(
            "| broker | "
            + " | ".join(f"{int(x):,} filler rows" for x in levels)
            + f" | {_ratio_title(levels)} |"
        )
        w("|---|" + "---:|" * (len(levels) + 1))
        for target in ("pgqueue", "sqla"):
            rows = [r for r in backlog if r["config"] == target]
            if not rows:
                continue
            cells = []
            for level in levels:
                t = [_get(r["metrics"], f"{level}.time_for_jobs") for r in rows]
                rate = [_get(r["metrics"], f"{level}.rate") for r in rows]
                capped = any((r["metrics"].get(level) or {}).get("capped") for r in rows)
                median_rate = spread(rate)
                per_second = f"; {median_rate[0]:,.0f}/s" if median_rate else ""
                mark = "\u2020" if capped else ""
                cells.append(f"{cell(t, 1, ' s')}{mark}{per_second}")
            ratio = []
            if len(levels) >= 2:
                for r in rows:
                    lo = _get(r["metrics"], f"{levels[0]}.time_for_jobs")
                    hi = _get(r["metrics"], f"{levels[-1]}.time_for_jobs")
                    ratio.append(hi / lo if lo and hi else None)
            name = (
                "pgqueue (Store.claim + Store.finish)"
                if target == "pgqueue"
                else "Kombu sqla (SimpleQueue.get + ack)"
            )
            w(f"| {name} | " + " | ".join(cells) + f" | {cell(ratio, 2, TIMES)} |")
        enq = [r for r in backlog if r["config"] == "pgqueue"]
        if enq and levels:
            w("")
            w(
                "pgqueue enqueue (one `Store.enqueue` per job, 1,000 jobs) at each level, jobs/s: "
                + "; ".join(
                    f"{int(x):,} rows {cell(_get(r['metrics'], f'{x}.enqueue_rate') for r in enq)}"
                    for x in levels
                )
                + "."
            )
        w("")

    # -- ceiling
    ceiling = [r for r in table.rows if r["measure"] == "ceiling" and r["status"] == "ok"]
    if ceiling:
        w(
            f"## Raw ceiling: pgqueue's statements without Celery ({params.get('ceiling_n', 0):,} "
            "jobs)"
        )
        w("")
        w(
            "`Store.enqueue([NewJob])` once per job with the transport's real payload; "
            "`Store.claim(limit)`, one `Store.mark_acked` for what it took (the early acks, "
            "which the transport writes in batches) and per job `Store.finish` (what a "
            "finished task writes), as a pgqueue worker does. Threads share one Store, as a "
            "process does. *Celery / raw* compares like with like: one producer against one "
            "enqueuing thread, the prefork -c 2 drain against two claiming threads."
        )
        w("")
        w("| operation | threads | jobs/s | Celery on pgqueue (same round) | Celery / raw |")
        w("|---|---:|---:|---:|---:|")
        keys = sorted(
            {
                k
                for r in ceiling
                for k in r["metrics"]
                if not k.startswith(("handoff", "celery_publish"))
            },
            key=_ceiling_order,
        )
        for key in keys:
            op, threads = key.rsplit("_t", 1)
            rates = [_get(r["metrics"], f"{key}.rate") for r in ceiling]
            celery_path, celery_label = _celery_counterpart(op, threads)
            celery_vals, shares = [], []
            for r in ceiling:
                ref = _counterpart_value(table, r["round"], celery_path)
                celery_vals.append(ref)
                mine = _get(r["metrics"], f"{key}.rate")
                shares.append(ref / mine if ref and mine else None)
            label = {"enqueue": "enqueue, 1 job per call"}.get(
                op, op.replace("claim_b", "claim (limit ") + ") + ack + finish"
            )
            w(
                f"| {label} | {threads} | {cell(rates)} | "
                f"{cell(celery_vals)} {celery_label} | {cell(shares, 2, TIMES)} |"
            )
        w("")

    floors = [r for r in ceiling if "celery_publish_t1" in r["metrics"]]
    if floors:
        celery_rate = [_get(r["metrics"], "celery_publish_t1.rate") for r in floors]
        raw_rate = [_get(r["metrics"], "enqueue_t1.rate") for r in floors]
        bound = [
            1.0 / (1.0 / c + 1.0 / e) if c and e else None
            for c, e in zip(celery_rate, raw_rate, strict=True)
        ]
        redis = [
            _counterpart_value(table, r["round"], ("throughput", "redis", "publish_rate"))
            for r in floors
        ]
        w(
            f"Celery's own publish path on Kombu's in-process `memory://` transport (no "
            f"broker): {cell(celery_rate)} `.delay()`/s. Adding one pgqueue enqueue "
            f"(raw rate above) per call bounds a pgqueue producer at {cell(bound)}/s with "
            f"no overhead of ours at all; Redis in the same rounds: {cell(redis)}/s."
        )
        w("")
    handoffs = [r for r in ceiling if "handoff" in r["metrics"]]
    if handoffs:
        rate = _get(handoffs[0]["metrics"], "handoff.rate") or 0
        w(f"### Handoff floor: publish -> claimed without Celery, {rate:g} jobs/s")
        w("")
        w(
            "One thread publishes at a steady rate, another sleeps on the wake-up and takes "
            "the job: pgqueue `Store.enqueue` (INSERT + NOTIFY, committed) -> LISTEN -> "
            "`Store.claim` (committed); Redis `LPUSH` -> `BRPOP`. What Celery's publish -> "
            "start latency adds on top of this is its own path, the same for both brokers."
        )
        w("")
        w("| broker | p50 ms | p99 ms | Celery publish -> start p50, same round |")
        w("|---|---:|---:|---:|")
        for key, label, config in (
            ("handoff", "pgqueue", "pgqueue"),
            ("handoff_redis", "Redis", "redis"),
        ):
            p50 = [_get(r["metrics"], f"{key}.p50_ms") for r in handoffs]
            if not any(v is not None for v in p50):
                continue
            p99 = [_get(r["metrics"], f"{key}.p99_ms") for r in handoffs]
            celery = [
                _counterpart_value(table, r["round"], ("latency", config, "start.p50_ms"))
                for r in handoffs
            ]
            w(f"| {label} | {cell(p50, 2)} | {cell(p99, 2)} | {cell(celery, 2)} |")
        w("")

    errors = [r for r in table.rows if r["status"] not in ("ok",)]
    if errors:
        w("## Failed or incomplete measurements")
        w("")
        for r in errors:
            w(
                f"- round {r['round']}, {r['config']} {r.get('pool') or ''} {r['measure']}: "
                f"{r['status']}: {str(r.get('reason', ''))[:300]}"
            )
        w("")
    return "\n".join(out) + "\n"


def _ratio_title(levels: list[str]) -> str:
    if len(levels) < 2:
        return "ratio"
    return f"time {_short(levels[-1])} / {_short(levels[0])}"


def _short(level: str) -> str:
    n = int(level)
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def _ceiling_order(key: str) -> tuple[int, str]:
    return (0 if key.startswith("enqueue") else 1, key)


def _celery_counterpart(op: str, threads: str) -> tuple[tuple[str, str, str] | None, str]:
    """The Celery measurement doing the same statements with the same parallelism."""
    if op == "enqueue" and threads == "1":
        return ("throughput", "pgqueue-noresult", "publish_rate"), "(publish, 1 producer)"
    if op.startswith("claim") and threads == "2":
        return ("throughput", "pgqueue-noresult", "drain_rate"), "(drain, prefork -c 2)"
    return None, ""


def _counterpart_value(
    table: Table, round_: int, path: tuple[str, str, str] | None
) -> float | None:
    if path is None:
        return None
    measure, config, metric = path
    for row in table.ok(measure, config, "prefork"):
        if row["round"] == round_:
            return _get(row["metrics"], metric)
    return None


def _unique_skips(skips: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for s in skips:
        seen.setdefault(s["config"], s)
    return list(seen.values())


Renderer = Callable[[list[dict[str, Any]]], str]
