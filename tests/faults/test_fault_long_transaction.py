"""A long transaction holds back vacuum during a steady run (issue #9, fault 5).

Any session with an open snapshot (a report in REPEATABLE READ, a forgotten ``BEGIN``
in psql) stops vacuum from removing rows deleted after it started. Every claim and
every completion leaves a dead row version in ``jobs`` and retention deletes finished
rows, so during the hold dead tuples pile up and the claim's index scan wades through
them. What must hold: the run keeps going while the snapshot is open, and once it
ends autovacuum (the table's 1 % setting from the migrations) removes the backlog:
dead tuples fall back, the table stops growing, and retention keeps deleting.

A private server with autovacuum on and a one-second naptime, as a production server
would have it (the machine's shared server runs with autovacuum off for CI).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from helpers import wait_until
from transport_process.procs import Database, Workers, pgqueue_url, write_app

from .server import (
    PACED_PRODUCER,
    add_timed_task,
    finish_producer,
    percentile,
    private_server,
    run_producer,
    start_latencies,
)

pytestmark = [pytest.mark.worker, pytest.mark.slow]

RATE = 150.0  # tasks per second
BEFORE, HOLD, AFTER = 15.0, 20.0, 25.0  # seconds of each phase
RETENTION = 5.0  # completed_retention
SETTINGS = {
    "autovacuum": "on",
    "autovacuum_naptime": "1s",
    "autovacuum_vacuum_cost_delay": "0",
    "synchronous_commit": "on",
}


@dataclass
class Sample:
    at: float  # seconds since the run started
    dead: int
    live: int
    size: int  # bytes, jobs with its indexes and TOAST
    vacuums: int


def test_a_snapshot_held_for_20_s_slows_nothing_for_good_and_vacuum_catches_up(
    tmp_path: Path, workers: Workers, measure
) -> None:
    with private_server(SETTINGS) as pg:
        try:
            _hold_snapshot_mid_run(tmp_path, pg, workers, measure)
        finally:
            workers.reap_all()


def _hold_snapshot_mid_run(tmp_path: Path, pg, workers: Workers, measure) -> None:  # type: ignore[no-untyped-def]
    db = Database(pg.url)
    app = write_app(
        tmp_path,
        pgqueue_url(pg.url),
        transport_options={"completed_retention": RETENTION, "maintenance_interval": 1.0},
    )
    add_timed_task(app)
    worker = workers.start(app, "w", concurrency=2)

    def sample(started: float) -> Sample:
        dead, live, size, vacuums = db.rows(
            "SELECT n_dead_tup, n_live_tup, pg_total_relation_size(relid),"
            " autovacuum_count + vacuum_count FROM pg_stat_user_tables WHERE relname = 'jobs'"
        )[0]
        return Sample(time.monotonic() - started, int(dead), int(live), int(size), int(vacuums))

    total = BEFORE + HOLD + AFTER
    started = time.monotonic()
    producer = run_producer(app, PACED_PRODUCER, str(RATE), str(total), name="paced")
    samples: list[Sample] = []
    holder: psycopg.Connection[tuple[object, ...]] | None = None
    hold_from = hold_to = 0.0
    try:
        while time.monotonic() - started < total:
            now = time.monotonic() - started
            if holder is None and not hold_from and now >= BEFORE:
                holder = psycopg.connect(pg.url)
                holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                holder.execute("SELECT count(*) FROM jobs")  # the snapshot is taken here
                hold_from = time.time()
            if holder is not None and now >= BEFORE + HOLD:
                holder.rollback()
                holder.close()
                holder = None
                hold_to = time.time()
            samples.append(sample(started))
            time.sleep(1.0)
    finally:
        if holder is not None:
            holder.close()
    result = finish_producer(producer, timeout=60)
    published = int(result["published"])
    wait_until(lambda: len(app.record.executions()) >= published, timeout=60, interval=0.2)
    assert worker.alive()

    # Nothing lost or run twice while vacuum was held back.
    executions = app.record.executions()
    assert len(executions) == published and max(executions.values()) == 1

    # The hold did hold vacuum back (else this test proves nothing), and once it
    # ended the dead tuples were removed and the table stopped growing.
    before = [s for s in samples if s.at < BEFORE]
    during = [s for s in samples if BEFORE + 2 <= s.at < BEFORE + HOLD]
    after = [s for s in samples if s.at >= BEFORE + HOLD]
    tail = [s for s in after if s.at >= BEFORE + HOLD + AFTER - 10]
    peak_dead = max(s.dead for s in during)
    assert peak_dead > 2 * max(s.dead for s in before), "the snapshot held nothing back"
    assert min(s.dead for s in tail) < peak_dead / 2, (
        f"dead tuples never fell after the snapshot ended: peak {peak_dead},"
        f" last 10 s {[s.dead for s in tail]}"
    )
    assert after[-1].vacuums > during[-1].vacuums, "no vacuum ran after the snapshot ended"
    size_at_release = during[-1].size
    assert max(s.size for s in tail) <= 1.25 * size_at_release, (
        f"the table kept growing after the snapshot ended: {size_at_release} ->"
        f" {[s.size for s in tail]}"
    )

    # Retention kept deleting throughout: no completed row far past its retention.
    stale = db.value(
        "SELECT count(*) FROM jobs WHERE status = 'completed'"
        " AND completed_at < now() - make_interval(secs => %s)",
        RETENTION + 5.0,
    )
    rows_left = int(db.value("SELECT count(*) FROM jobs"))
    assert stale == 0, f"{stale} completed rows outlived retention by 5 s"
    assert rows_left < published / 4, f"{rows_left} of {published} rows are still there"

    latencies = start_latencies(app.record)
    phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    starts: dict[str, int] = {"before": 0, "during": 0, "after": 0}

    def phase_of(at: float) -> str:
        return "before" if at < hold_from else "during" if at < hold_to else "after"

    for line in app.record.lines():
        sent, _, began = line.label.partition("/")
        phases[phase_of(float(sent))].append(latencies[line.task_id])
        starts[phase_of(float(began))] += 1
    seconds = {"before": BEFORE, "during": hold_to - hold_from, "after": AFTER}
    figures = "; ".join(
        f"{name}: {starts[name] / seconds[name]:.0f} tasks/s, publish->start p50"
        f" {percentile(values, 0.5) * 1000:.0f} ms p99 {percentile(values, 0.99) * 1000:.0f} ms"
        for name, values in phases.items()
    )
    measure(
        f"{published} tasks at {RATE:.0f}/s, snapshot held {hold_to - hold_from:.0f} s: {figures};"
        f" jobs dead tuples max before {max(s.dead for s in before)}, peak during {peak_dead},"
        f" last 10 s after {min(s.dead for s in tail)}-{max(s.dead for s in tail)};"
        f" size MB before {before[-1].size / 2**20:.2f}, at release {size_at_release / 2**20:.2f},"
        f" end {after[-1].size / 2**20:.2f}; vacuums {samples[0].vacuums}->{after[-1].vacuums};"
        f" rows left {rows_left} (retention {RETENTION:.0f} s); lost 0, run twice 0"
    )
    measure(
        "jobs (s, dead tuples, MB): "
        + " ".join(f"({s.at:.0f}, {s.dead}, {s.size / 2**20:.1f})" for s in samples[::3])
    )
