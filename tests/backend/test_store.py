"""The backend's statements against real PostgreSQL: fencing, attempts, NOTIFY, chords."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from helpers import wait_until

from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import NewJob, Store
from celery_pgqueue.store.notify import INLINE_RESULT_BYTES, result_note
from celery_pgqueue.store.results import StateWrite

from .conftest import pgqueue_url, release_database_clients, rows


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    yield Store.for_url(pgqueue_url(database_url))
    release_database_clients()


def write(job_id: uuid.UUID, state: str, attempt: int | None, **kwargs: object) -> StateWrite:
    status = {
        "STARTED": JobStatus.RUNNING,
        "PROGRESS": JobStatus.RUNNING,
        "RETRY": JobStatus.QUEUED,
        "SUCCESS": JobStatus.COMPLETED,
        "FAILURE": JobStatus.FAILED,
        "REVOKED": JobStatus.CANCELLED,
    }[state]
    log = {
        "RETRY": LogStatus.RETRY,
        "SUCCESS": LogStatus.SUCCESS,
        "FAILURE": LogStatus.FAILED,
        "REVOKED": LogStatus.FAILED,
    }.get(state)
    defaults: dict[str, object] = {
        "job_id": job_id,
        "status": status,
        "log_status": log,
        "document": {"status": state},
        "ready": state in ("SUCCESS", "FAILURE", "REVOKED"),
        "attempt": attempt,
        "transport_owned": False,
        "queue_name": "celery",
    }
    defaults.update(kwargs)
    return StateWrite(**defaults)  # type: ignore[arg-type]


def test_another_brokers_task_gets_a_row_and_one_log_row_per_attempt(
    store: Store, database_url: str
) -> None:
    job_id = uuid.uuid4()

    assert store.write_state(write(job_id, "RETRY", 1, retry_in=60.0), notify=False)
    assert store.write_state(write(job_id, "STARTED", 2), notify=False)
    assert store.write_state(
        write(job_id, "SUCCESS", 2, max_attempts=4, started_ago=2.0), notify=False
    )

    [(status, attempts, max_attempts, queue, run_at, created)] = rows(
        database_url,
        "SELECT status, attempt_count, max_attempts, queue_name, run_at, created_at FROM jobs",
    )
    assert (status, attempts, max_attempts, queue) == ("completed", 2, 4, "celery")
    assert run_at > created + timedelta(seconds=50), "RETRY put run_at at the next attempt"
    logs = rows(
        database_url,
        "SELECT attempt_number, status, finished_at IS NOT NULL FROM job_logs"
        " ORDER BY attempt_number",
    )
    assert logs == [(1, "retry", True), (2, "success", True)]
    assert rows(database_url, "SELECT name FROM job_queues") == [("celery",)]


def test_a_late_write_of_an_older_attempt_never_overwrites_a_newer_one(
    store: Store, database_url: str
) -> None:
    job_id = uuid.uuid4()
    store.write_state(write(job_id, "SUCCESS", 2), notify=False)

    fenced = store.write_state(write(job_id, "RETRY", 1), notify=False)

    assert not fenced
    assert rows(database_url, "SELECT status, attempt_count FROM jobs") == [("completed", 2)]
    assert rows(
        database_url, "SELECT attempt_number, status FROM job_logs ORDER BY attempt_number"
    ) == [(1, "retry"), (2, "success")], "the older attempt's log row is still recorded"


def test_a_completed_job_is_never_overwritten(store: Store, database_url: str) -> None:
    job_id = uuid.uuid4()
    store.write_state(write(job_id, "SUCCESS", 1), notify=False)

    assert not store.write_state(write(job_id, "FAILURE", None, error_message="x"), notify=False)
    assert not store.write_state(write(job_id, "REVOKED", None), notify=False)
    assert rows(database_url, "SELECT status, result->>'status' FROM jobs") == [
        ("completed", "SUCCESS")
    ]


def test_transport_rows_are_fenced_by_the_delivered_attempt(
    store: Store, database_url: str
) -> None:
    job_id = uuid.uuid4()
    store.enqueue([NewJob(id=job_id, queue_name="celery", payload={"headers": {}})])
    [claimed] = store.claim("celery", 1, "test-owner")
    assert claimed.attempt == 1

    stale = write(job_id, "SUCCESS", 7, transport_owned=True)
    assert not store.write_state(stale, notify=False)
    assert store.write_state(write(job_id, "SUCCESS", 1, transport_owned=True), notify=False)

    assert rows(database_url, "SELECT status, result->>'status' FROM jobs") == [
        ("completed", "SUCCESS")
    ]
    assert rows(database_url, "SELECT attempt_number, status FROM job_logs") == [(1, "success")]


def test_ready_states_notify_waiters_at_commit_with_the_job_id(
    store: Store, database_url: str
) -> None:
    job_id = uuid.uuid4()
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{store.result_channel}"')
        store.write_state(write(job_id, "STARTED", 1), notify=True)
        store.write_state(write(job_id, "SUCCESS", 1), notify=True)
        received = [n.payload for n in listener.notifies(timeout=0.5, stop_after=2)]
    assert received == [str(job_id)], "one NOTIFY, for the ready state only"


def test_a_small_success_rides_in_its_notify_and_a_large_one_does_not(
    store: Store, database_url: str
) -> None:
    small, large = uuid.uuid4(), uuid.uuid4()
    documents = {
        small: {"status": "SUCCESS", "result": "it's small"},
        large: {"status": "SUCCESS", "result": "x" * INLINE_RESULT_BYTES},
    }
    store.enqueue([NewJob(id=j, queue_name="celery", payload={"headers": {}}) for j in documents])
    assert len(store.claim("celery", 2, "test-owner")) == 2
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{store.result_channel}"')
        for job_id, document in documents.items():
            written = write(job_id, "SUCCESS", 1, transport_owned=True, document=document)
            assert store.write_state(written, notify=True)
        received = [n.payload for n in listener.notifies(timeout=0.5, stop_after=2)]

    notes = dict(result_note(p) for p in received)
    assert notes.keys() == {str(small), str(large)}
    assert notes[str(large)] is None, "too large: the waiter reads it"
    carried = notes[str(small)]
    assert carried is not None
    assert json.loads(carried.result_json) == documents[small]
    [(completed_at,)] = rows(database_url, "SELECT completed_at FROM jobs WHERE id = %s", small)
    assert abs((carried.finished_at - completed_at).total_seconds()) < 0.001


def test_notify_off_sends_nothing(store: Store, database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{store.result_channel}"')
        store.write_state(write(uuid.uuid4(), "SUCCESS", 1), notify=False)
        assert list(listener.notifies(timeout=0.3)) == []


def test_read_results_returns_only_ready_rows_when_asked(store: Store) -> None:
    done, running = uuid.uuid4(), uuid.uuid4()
    store.write_state(write(done, "SUCCESS", 1), notify=False)
    store.write_state(write(running, "STARTED", 1), notify=False)

    everything = {r.id: r.status for r in store.read_results([done, running, uuid.uuid4()])}
    ready = [r.id for r in store.read_results([done, running], ready_only=True)]

    assert everything == {done: "completed", running: "running"}
    assert ready == [done]


def test_each_chord_part_counts_once_and_exactly_one_caller_starts_the_body(
    store: Store, database_url: str
) -> None:
    group_id = uuid.uuid4()
    parts = [uuid.uuid4() for _ in range(200)]
    store.set_chord_size(group_id, len(parts))
    claims: list[uuid.UUID] = []
    lock = threading.Lock()

    def count(chunk: list[uuid.UUID]) -> None:
        for index, task_id in chunk:
            # every part reports twice, as a redelivered task would
            for _ in range(2):
                if store.count_chord_part(group_id, task_id, index, "SUCCESS"):
                    with lock:
                        claims.append(task_id)

    indexed = list(enumerate(parts))
    threads = [threading.Thread(target=count, args=(indexed[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(claims) == 1, "the body starts exactly once"
    assert rows(database_url, "SELECT chord_done, chord_size FROM job_groups") == [(200, 200)]
    ordered = [p.task_id for p in store.chord_parts(group_id)]
    assert ordered == parts, "parts come back in header order"


def test_parts_counted_before_the_size_is_known_still_complete_the_chord(store: Store) -> None:
    group_id = uuid.uuid4()
    first, last = uuid.uuid4(), uuid.uuid4()

    assert not store.count_chord_part(group_id, first, 0, "SUCCESS")
    store.set_chord_size(group_id, 2)  # Celery sets it just before the last header publish
    assert store.count_chord_part(group_id, last, 1, "FAILURE")
    assert [p.state for p in store.chord_parts(group_id)] == ["SUCCESS", "FAILURE"]


def test_add_to_chord_makes_the_chord_wait_for_more(store: Store) -> None:
    group_id = uuid.uuid4()
    store.set_chord_size(group_id, 1)
    store.add_to_chord(group_id)

    assert not store.count_chord_part(group_id, uuid.uuid4(), 0, "SUCCESS")
    assert store.count_chord_part(group_id, uuid.uuid4(), 1, "SUCCESS")


def test_groups_are_saved_read_and_deleted_with_their_parts(
    store: Store, database_url: str
) -> None:
    group_id = uuid.uuid4()
    store.save_group(group_id, ["g", [["a", None]]])
    store.count_chord_part(group_id, uuid.uuid4(), 0, "SUCCESS")

    assert store.group(group_id) == '["g", [["a", null]]]'
    assert store.delete_group(group_id) == 1
    assert store.group(group_id) is None
    assert rows(database_url, "SELECT count(*) FROM job_chord_parts") == [(0,)]


def test_prune_groups_deletes_old_groups_in_batches(store: Store, database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO job_groups (id, updated_at)"
            " SELECT gen_random_uuid(), now() - interval '2 days' FROM generate_series(1, 2500)"
        )
        conn.execute("INSERT INTO job_groups (id) VALUES (gen_random_uuid())")

    assert store.prune_groups(older_than=86_400) == 2500
    assert rows(database_url, "SELECT count(*) FROM job_groups") == [(1,)]


def test_the_listener_reconnects_and_asks_waiters_to_read_again(
    store: Store, database_url: str
) -> None:
    class Waiter:
        def __init__(self) -> None:
            self.ids: list[str] = []
            self.resyncs = 0

        def notified(self, notes: Mapping[str, Any]) -> None:
            self.ids.extend(notes)

        def resync(self) -> None:
            self.resyncs += 1

    waiter = Waiter()
    listener = store.result_listener()
    listener.register(waiter)
    assert listener.ensure_listening()
    before = waiter.resyncs

    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN %%'"
        )
    wait_until(lambda: waiter.resyncs > before and listener.listening, timeout=10)

    job_id = uuid.uuid4()
    store.write_state(write(job_id, "SUCCESS", 1), notify=True)
    wait_until(lambda: str(job_id) in waiter.ids, timeout=5)
