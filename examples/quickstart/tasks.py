"""The demo's Celery app: ordinary tasks, configured by two URLs and nothing else."""

from __future__ import annotations

import os
import time

from celery import Celery

DATABASE = os.environ.get("CELERY_PGQUEUE_URL", "pgqueue://postgres@127.0.0.1:5432/postgres")

app = Celery("quickstart", broker=DATABASE, backend=DATABASE)
app.conf.update(
    # Lower-number-first across a backlog: each process holds only the task it runs.
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    broker_transport_options={"polling_interval": 0.5},
    result_expires=3600,
)


@app.task
def send_receipt(order_id: int) -> str:
    """Stands for real work: it gets an id, not the order itself."""
    time.sleep(0.05)
    return f"receipt for order {order_id}"


@app.task(bind=True, max_retries=3)
def charge_card(self, order_id: int) -> str:  # type: ignore[no-untyped-def]
    """Fails twice (a flaky payment provider), succeeds on the third attempt."""
    if self.request.retries < 2:
        raise self.retry(countdown=0.2, exc=ConnectionError("provider timed out"))
    return f"charged order {order_id} on attempt {self.request.retries + 1}"


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def total(values: list[int]) -> int:
    return sum(values)
