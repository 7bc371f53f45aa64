"""The benchmark harness still runs end to end (benchmarks/run.py --quick --only pgqueue).

Only the shape of the output is checked: every measure produced rows, the Markdown
table was rendered, and the databases the harness created were dropped. Timings are
never asserted; they live in benchmarks/results/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "benchmarks" / "run.py"


@pytest.mark.slow
@pytest.mark.worker
@pytest.mark.timeout(280)
def test_quick_pgqueue_run_writes_rows_and_a_table(pg_server_url: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--only", "pgqueue", "--output-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=260,
        check=False,
        env={**_clean_env(), "BENCH_PG_URL": pg_server_url},
    )
    assert done.returncode == 0, f"harness failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    header = next(r for r in rows if r["kind"] == "run")
    measured = [r for r in rows if r["kind"] == "measurement"]
    assert {r["measure"] for r in measured} == {
        "throughput",
        "latency",
        "memory",
        "ceiling",
        "backlog",
    }
    assert all(r["status"] == "ok" for r in measured), [
        (r["measure"], r["config"], r["reason"]) for r in measured if r["status"] != "ok"
    ]
    drained = [r for r in measured if r["measure"] == "throughput"]
    assert drained and all(r["metrics"]["missing"] == 0 for r in drained)

    table = (tmp_path / "latest.md").read_text()
    assert "| pgqueue broker" in table
    assert "## Raw ceiling" in table

    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname = ANY(%s)", (header["databases"],)
        ).fetchall()
    assert left == [], "the harness must drop the databases it created"


def _clean_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        env.pop(key, None)
    return env
