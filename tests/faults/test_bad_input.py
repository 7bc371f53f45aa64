"""Bad input, with real PostgreSQL and real workers: a named error with the fix, no partial row.

Publisher-side mistakes raise at ``.delay()`` and leave nothing behind; worker-side
mistakes (configuration, credentials, schema) stop ``celery worker`` at start-up with
the fix in its log instead of a reconnect loop; and a ``jobs`` row edited by hand
into something no worker can take is marked failed, named in the worker's log, while
the worker carries on with everything else. Secrets never appear in any of it.
"""

from __future__ import annotations

import base64
import json
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from helpers import wait_until
from transport_process.procs import (
    App,
    Database,
    Worker,
    Workers,
    task_specs,
    write_app,
)

from celery_pgqueue.store import Store

pytestmark = [pytest.mark.worker]

MIGRATE_COMMANDS = ("celery-pgqueue migrate", "celery -A proj pgqueue migrate")


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    """Each test's database is dropped afterwards: let go of this process's pools."""
    yield
    for store in list(Store._registry.values()):
        store.dispose()
    Store._registry.clear()


@pytest.fixture
def producer(broker_url: str) -> Iterator[Celery]:
    """A Celery app in this process publishing to the test database, as a web app would."""
    app = Celery("producer", set_as_current=False)
    app.conf.update(broker_url=broker_url, result_backend=None, task_default_queue="celery")

    @app.task(name="proc.record", shared=False)
    def record(*args: Any, **kwargs: Any) -> None: ...

    yield app
    app.close()


def _worker_fails_to_start(app: App, *args: str, timeout: float = 45.0) -> tuple[int, str]:
    """Run ``celery worker`` expecting it to stop on its own; its exit code and log."""
    worker = Worker(app, "doomed", ["--pool", "prefork", "-c", "1", *args])
    try:
        code = worker.wait(timeout)
        log = worker.log()
        assert code is not None, f"the worker kept running (retrying?):\n{log[-3000:]}"
    finally:
        worker.reap(grace=0)
    return code, log


def _full_text(exc: BaseException) -> str:
    """An exception as a user would see it logged: the whole chain, with causes."""
    return "".join(traceback.format_exception(exc))


# -- rows edited by hand ---------------------------------------------------------------


def _message(task: str, task_id: str, **changes: Any) -> dict[str, Any]:
    """A stored payload in the shape the transport writes, with ``changes`` applied."""
    document: dict[str, Any] = {
        "body": [[], {"label": "hand-made"}, {}],
        "body_encoding": "json",
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {"task": task, "id": task_id},
        "properties": {"priority": None},
        "exchange": "",
        "routing_key": "celery",
    }
    document.update(changes)
    return document


def _base64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# id: (payload given the job id (None: SQL NULL), how the row's error reads)
BROKEN_ROWS: dict[str, tuple[Any, str]] = {
    "payload-is-a-string": (lambda i: "garbage", "the payload is a JSON string, not an object"),
    "payload-is-null": (lambda i: None, "the payload is a JSON null, not an object"),
    "headers-not-an-object": (
        lambda i: _message("proc.record", i, headers="proc.record"),
        "payload 'headers' is a JSON string, not an object",
    ),
    "no-content-type": (
        lambda i: _message("proc.record", i, **{"content-type": None}),
        "the payload has no 'content-type'",
    ),
    "body-not-base64": (
        lambda i: _message("proc.record", i, body="***", body_encoding="base64"),
        "payload 'body' is not valid base64",
    ),
    "json-body-not-json": (
        lambda i: _message("proc.record", i, body=_base64("[[], {"), body_encoding="base64"),
        "payload 'body' is not JSON although its content-type says so",
    ),
    "unknown-body-encoding": (
        lambda i: _message("proc.record", i, body_encoding="rot13"),
        "payload 'body_encoding' must be one of",
    ),
    "retries-not-a-number": (
        lambda i: _message(
            "proc.record", i, headers={"task": "proc.record", "id": i, "retries": "x"}
        ),
        "payload header 'retries' is not an integer",
    ),
    "body-celery-cannot-unpack": (
        lambda i: _message("proc.record", i, body="just text"),
        "InvalidPayload: ValueError",
    ),
    "unregistered-task": (
        lambda i: _message("nobody.has.this", i),
        "Rejected: the worker rejected the message",
    ),
}


def test_rows_edited_into_nonsense_are_failed_and_logged_while_the_worker_carries_on(
    tmp_path: Path,
    broker_url: str,
    db: Database,
    workers: Workers,
    producer: Celery,
    measure,
) -> None:
    lease, maintenance = 2.0, 0.5
    app = write_app(
        tmp_path,
        broker_url,
        transport_options={"lease_seconds": lease, "maintenance_interval": maintenance},
    )
    worker = workers.start(app, "sturdy")
    before = task_specs(3, label="before")
    app.send(before)

    broken: dict[str, str] = {}
    for name, (payload, _) in BROKEN_ROWS.items():
        job_id = str(uuid.uuid4())
        document = payload(job_id)
        db.rows(
            "INSERT INTO jobs (id, queue_name, priority, payload)"
            " VALUES (%s, 'celery', 0, %s::jsonb) RETURNING id",
            uuid.UUID(job_id),
            None if document is None else json.dumps(document),
        )
        broken[name] = job_id

    # Two valid messages whose rows say "running" without any lease: no worker holds
    # them and no heartbeat will ever extend them. Published to a queue nobody reads,
    # then moved by hand.
    unleased = task_specs(2, label="unleased")
    for spec in unleased:
        producer.send_task("proc.record", kwargs=spec["kwargs"], task_id=spec["id"], queue="parked")
    db.rows(
        "UPDATE jobs SET queue_name = 'celery', status = 'running', attempt_count = 1,"
        " lease_owner = 'ghost', lease_expires_at = NULL,"
        " acked_at = CASE WHEN id = %s THEN now() END"
        " WHERE id = ANY(%s::uuid[]) RETURNING id",
        uuid.UUID(unleased[1]["id"]),
        [s["id"] for s in unleased],
    )
    after = task_specs(3, label="after")
    app.send(after)
    app.close()

    good = [s["id"] for s in before + after]
    expected = {
        **dict.fromkeys([*good, unleased[0]["id"]], "completed"),
        **dict.fromkeys([*broken.values(), unleased[1]["id"]], "failed"),
    }

    def settled() -> bool:
        statuses = db.rows(
            "SELECT id::text, status FROM jobs WHERE id = ANY(%s::uuid[])", list(expected)
        )
        return dict(statuses) == expected

    try:
        wait_until(settled, timeout=lease + maintenance + 30, message="every row settled")
    except AssertionError:
        raise AssertionError(f"{db.stuck()}\n{worker.log()[-3000:]}") from None
    # Long enough for rescue to have taken anything back, had anything been left running.
    time.sleep(2 * (lease + maintenance))
    assert worker.alive(), worker.log()[-3000:]
    log = worker.log()

    for name, job_id in broken.items():
        job = db.job(job_id)
        assert job is not None
        assert job["status"] == "failed", (name, job)
        assert job["attempt_count"] == 1, f"{name}: claimed again"
        assert BROKEN_ROWS[name][1] in (job["last_error_message"] or ""), (name, job)
        assert [s for _, s, _ in db.logs(job_id)] == ["failed"], name
        if job["last_error_message"].startswith("InvalidPayload"):
            assert f"job {job_id}" in log, name
            assert f"pgqueue retry {job_id}" in log, name
    assert "garbage" not in log, "payloads are never logged"
    for task_id in good:
        assert [e.event for e in app.record.events(task_id)] == ["run"], task_id

    requeued, lost = unleased[0]["id"], unleased[1]["id"]
    assert [e.event for e in app.record.events(requeued)] == ["run"]
    assert (db.status(requeued), (db.job(requeued) or {})["attempt_count"]) == ("completed", 2)
    assert app.record.events(lost) == [], "acked before it lost its lease: never run again"
    assert "worker lost" in ((db.job(lost) or {})["last_error_message"] or "").lower()
    measure(
        f"{len(broken)} rows edited into nonsense: all failed with the reason, each once; "
        f"2 running rows without a lease: rescued (requeued and run / failed 'worker lost'); "
        f"{len(good)} good tasks ran once; the worker never stopped"
    )
