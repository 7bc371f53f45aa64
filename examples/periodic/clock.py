"""Periodic tasks sent by any number of `celery beat` processes, state in PostgreSQL.

Run the beat with ``-S celery_pgqueue.beat:Scheduler`` (or ``-S pgqueue``); start two
and only one sends, the other takes over within ``pgqueue_beat_lease_seconds`` if it
dies. Nothing here imports celery_pgqueue: the URL and the scheduler name are all.
"""

import os
import time

from celery import Celery
from celery.schedules import crontab

app = Celery("clock")
app.conf.update(
    broker_url=os.environ.get("CELERY_PGQUEUE_URL", "pgqueue://postgres@127.0.0.1:5432/periodic"),
    result_backend=None,
    broker_connection_retry_on_startup=True,
    # The schedule's name in job_schedules (default: the app's main name, "clock").
    pgqueue_beat_name="clock",
    # How soon a standby beat sends after the leading one dies (default 10 s).
    pgqueue_beat_lease_seconds=10,
    beat_schedule={
        "heartbeat": {"task": "clock.heartbeat", "schedule": 2.0},
        "minutely-report": {"task": "clock.report", "schedule": crontab()},
    },
)


@app.task(name="clock.heartbeat")
def heartbeat() -> float:
    now = time.time()
    print(f"heartbeat at {now:.3f}")
    return now


@app.task(name="clock.report")
def report() -> str:
    print("the minute's report")
    return "reported"
