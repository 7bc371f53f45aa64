"""Each example runs as its README says: a real `celery worker` and a real round trip."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from helpers import wait_until

from celery_pgqueue.store.schema import REQUIRED_REVISION

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = [pytest.mark.worker, pytest.mark.slow]


def _pgqueue(database_url: str) -> str:
    return "pgqueue://" + database_url.split("://", 1)[1]


def _roundtrip(folder: Path, app: str, call: str, database_url: str) -> str:
    env = {**os.environ, "CELERY_PGQUEUE_URL": _pgqueue(database_url), "PYTHONPATH": str(folder)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", app, "worker", "-c", "1", "-l", "warning"],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", call],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout.strip()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


def test_minimal_project_needs_only_two_urls(database_url: str) -> None:
    call = "from tasks import add; print(add.delay(2, 3).get(timeout=30))"
    assert _roundtrip(EXAMPLES / "minimal", "tasks", call, database_url) == "5"


def test_settings_style_project_configures_everything_from_settings(database_url: str) -> None:
    call = "from proj import greet; print(greet.delay('world').get(timeout=30))"
    assert _roundtrip(EXAMPLES / "settings_style", "proj", call, database_url) == "hello world"


def test_quickstart_demo_runs_to_completion(database_url: str) -> None:
    env = {**os.environ, "CELERY_PGQUEUE_URL": _pgqueue(database_url)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart" / "demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    out = done.stdout
    assert "ran in this order: receipt for order 2, receipt for order 4" in out
    assert "charged order 7 on attempt 3" in out
    assert "sum of squares: 90" in out
    assert "after resume: 2" in out
    assert "done in" in out


def test_orders_example_confirms_an_order_committed_with_its_task(database_url: str) -> None:
    call = (
        "from shop import place_order, wait_confirmed; "
        "place_order(42, 'ada@example.com'); print(wait_confirmed(42))"
    )
    assert _roundtrip(EXAMPLES / "orders", "shop", call, database_url) == "True"


def test_periodic_example_runs_two_beats_and_one_sends(database_url: str, tmp_path: Path) -> None:
    folder = EXAMPLES / "periodic"
    url = _pgqueue(database_url)
    env = {**os.environ, "CELERY_PGQUEUE_URL": url, "PYTHONPATH": str(folder)}
    migrated = subprocess.run(
        [sys.executable, "-m", "celery_pgqueue", "migrate", "--url", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert REQUIRED_REVISION in migrated.stdout
    commands = {
        "worker": ["worker", "-l", "info", "-c", "1"],
        "beat-1": ["beat", "-S", "celery_pgqueue.beat:Scheduler", "-l", "info"],
        "beat-2": ["beat", "-S", "celery_pgqueue.beat:Scheduler", "-l", "info"],
    }
    started = {}
    for name, args in commands.items():
        log = open(tmp_path / f"{name}.log", "wb")
        started[name] = (
            subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "clock", *args],
                cwd=folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ),
            log,
        )
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            wait_until(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM jobs WHERE status = 'completed'"
                        " AND payload->'headers'->>'task' = 'clock.heartbeat'"
                    ).fetchone()[0]  # type: ignore[index]
                    >= 3
                ),
                timeout=90,
                interval=0.5,
            )
        listed = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "clock", "pgqueue", "schedule", "list"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    finally:
        for process, log in started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            log.close()
    assert "heartbeat" in listed.stdout and "led by" in listed.stdout, listed.stdout
    beats = [(tmp_path / f"beat-{n}.log").read_text() for n in (1, 2)]
    assert sum("leading schedule 'clock'" in log for log in beats) >= 1
    assert sum("standing by" in log for log in beats) >= 1
