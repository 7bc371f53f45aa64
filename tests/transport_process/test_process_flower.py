"""Flower next to a worker keeps seeing new tasks and the worker, minutes on end.

Flower (like ``celery events``) reads events through Celery's ``EventReceiver``, a
Kombu ``ConsumerMixin`` that calls ``drain_events()`` with no event loop. Its queue
expires when unused (Celery's ``event_queue_expires``, 60 s), so its process must
keep the queue alive for as long as it consumes: otherwise the worker's maintenance
drops the queue with its bindings after a minute and Flower goes silent.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from celery_pgqueue.devserver_cluster import free_port

from .procs import CELERY, Database, Workers, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow, pytest.mark.timeout(600)]

# Three times Celery's event_queue_expires.
WATCH_SECONDS = 180.0
ROUND_SECONDS = 15.0


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def test_flower_still_shows_new_tasks_and_the_worker_online_after_three_minutes(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, measure
) -> None:
    app = write_app(
        tmp_path,
        broker_url,
        worker_send_task_events=True,
        transport_options={"maintenance_interval": 1.0},
    )
    workers.start(app, "watched", pool="solo", heartbeat=True)
    port = free_port()
    log_path = tmp_path / "flower.log"
    with open(log_path, "wb") as log:
        flower = subprocess.Popen(
            [*CELERY, "-A", app.module, "flower", f"--port={port}", "--address=127.0.0.1"],
            cwd=app.directory,
            env={**app.env, "FLOWER_UNAUTHENTICATED_API": "true"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: _get(port, "/api/workers?status=true"),
            timeout=60,
            ignore=(OSError,),
            message="Flower answers and knows a worker",
        )
        started = time.monotonic()
        seen = 0
        while True:
            [spec] = task_specs(1, label=f"round{seen}")
            app.send([spec])
            wait_until(
                lambda t=spec["id"]: _get(port, "/api/tasks").get(t, {}).get("state") == "SUCCESS",
                timeout=30,
                interval=0.5,
                message=f"Flower shows task {seen} as succeeded "
                f"({time.monotonic() - started:.0f} s after the first)",
            )
            status = _get(port, "/api/workers?status=true")
            watched = {name: alive for name, alive in status.items() if name.startswith("watched@")}
            assert watched and all(watched.values()), f"worker online in Flower: {status}"
            seen += 1
            if time.monotonic() - started >= WATCH_SECONDS:
                break
            time.sleep(ROUND_SECONDS)
    finally:
        app.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flower.pid, signal.SIGTERM)
        try:
            flower.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(flower.pid, signal.SIGKILL)
            flower.wait(10)
    measure(f"Flower saw {seen} tasks over {time.monotonic() - started:.0f} s, worker online")
