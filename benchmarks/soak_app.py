"""The Celery app of ``soak.py``'s workers and producer.

Broker from ``$SOAK_BROKER``, transport options (retention, maintenance) as JSON from
``$SOAK_OPTIONS``. Each task's start is recorded in the process that runs it: one line
``published_at started_at`` appended to ``$SOAK_RECORDS/<pid>.txt`` (one ``write`` on
an ``O_APPEND`` file per task: 300 a second over 8 processes costs nothing).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery, signals

import celery_pgqueue  # noqa: F401  (registers pgqueue:// without the .pth too)

app = Celery("soak")
app.conf.update(
    broker_url=os.environ.get("SOAK_BROKER", ""),
    broker_transport_options=json.loads(os.environ.get("SOAK_OPTIONS", "{}")),
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)
RECORDS = os.environ.get("SOAK_RECORDS", "")


@app.task(name="soak.tick")
def tick(published_at: float) -> None:
    """Does nothing: the soak measures the queue, not the task."""


def _on_prerun(task: Any = None, args: Any = None, **_: Any) -> None:
    if not RECORDS or not args:
        return
    line = f"{args[0]!r} {time.time()!r}\n".encode()
    fd = os.open(
        os.path.join(RECORDS, f"{os.getpid()}.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT
    )
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


signals.task_prerun.connect(_on_prerun, weak=False)
