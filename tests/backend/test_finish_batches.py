"""FINISH_MANY: a batch of finishes (states, results, log rows, acks) is one statement."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import NewJob, Store
from celery_pgqueue.store.batches import Finish

from .conftest import pgqueue_url, release_database_clients, rows


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield Store.for_url(pgqueue_url(database_url))
    release_database_clients()


def _claimed(store: Store, n: int) -> list[tuple[uuid.UUID, int]]:
    ids = [uuid.uuid4() for _ in range(n)]
    store.enqueue([NewJob(id=i, queue_name="celery", payload={"headers": {}}) for i in ids])
    return [(c.id, c.attempt) for c in store.claim("celery", n, "test-owner")]


def test_a_finish_batch_writes_all_its_rows_as_one_statement(
    store: Store, database_url: str
) -> None:
    held = _claimed(store, 6)
    finishes = [
        Finish(
            job_id=job_id,
            attempt=attempt,
            status=JobStatus.COMPLETED if n % 2 else JobStatus.FAILED,
            log_status=LogStatus.SUCCESS if n % 2 else LogStatus.FAILED,
            result={"status": "SUCCESS" if n % 2 else "FAILURE", "result": n},
            error_message=None if n % 2 else "ValueError: boom",
            notify=True,
        )
        for n, (job_id, attempt) in enumerate(held)
    ]
    statements: list[str] = []

    def seen(*args: Any) -> None:
        statements.append(args[2])

    engine = store.pool.engine
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        written = store.finish_many(finishes, notify=True)
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)

    assert len(statements) == 1, statements
    assert written == {job_id for job_id, _ in held}
    got = rows(
        database_url,
        "SELECT status, (result->>'result')::int, acked_at IS NOT NULL, lease_owner,"
        " last_error_message FROM jobs ORDER BY (result->>'result')::int",
    )
    assert got == [
        (
            "completed" if n % 2 else "failed",
            n,
            True,
            None,
            None if n % 2 else "ValueError: boom",
        )
        for n in range(6)
    ]
    logs = rows(database_url, "SELECT status, finished_at IS NOT NULL FROM job_logs")
    assert sorted(logs) == sorted([("success" if n % 2 else "failed", True) for n in range(6)])


def test_each_row_of_a_batch_is_fenced_by_its_attempt(store: Store, database_url: str) -> None:
    (first, attempt), (second, attempt2) = _claimed(store, 2)
    finishes = [
        Finish(
            job_id=first,
            attempt=attempt + 5,
            status=JobStatus.COMPLETED,
            log_status=LogStatus.SUCCESS,
            result={"status": "SUCCESS"},
        ),
        Finish(
            job_id=second,
            attempt=attempt2,
            status=JobStatus.COMPLETED,
            log_status=LogStatus.SUCCESS,
            result={"status": "SUCCESS"},
        ),
    ]

    assert store.finish_many(finishes, notify=False) == {second}
    assert sorted(rows(database_url, "SELECT id = %s, status FROM jobs", second)) == [
        (False, "running"),
        (True, "completed"),
    ]
