"""Global concurrency limits per queue: at most N running jobs across every claimer.

A claim of a limited queue takes no more than the free slots (the limit minus the
queue's running jobs, claimed-but-not-started ones included); racing claimers on
their own connections never push the queue past its limit; finishing, requeueing and
removing the limit give slots back, and a slot freed by a finish wakes the workers.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from store_factories import Db, new_job, notifications_up_to_marker

from celery_pgqueue.errors import ConfigurationError, UnknownQueue
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import Store
from celery_pgqueue.store.listener import Listener
from celery_pgqueue.store.results import StateWrite


def _complete(store: Store, job_id: object, attempt: int = 1) -> bool:
    return store.finish(
        job_id,  # type: ignore[arg-type]
        attempt=attempt,
        status=JobStatus.COMPLETED,
        log_status=LogStatus.SUCCESS,
    )


def test_a_claim_takes_only_the_free_slots_of_a_limited_queue(store: Store, db: Db) -> None:
    store.enqueue([new_job("limited") for _ in range(10)])
    store.set_queue_limit("limited", 3)

    first = store.claim("limited", 1, "w1")
    assert len(first) == 1
    # A prefetching worker asks for many: it gets what the limit leaves.
    assert len(store.claim("limited", 10, "w2")) == 2
    assert store.claim("limited", 10, "w3") == []
    assert db.scalar("SELECT count(*) FROM jobs WHERE status = 'running'") == 3

    assert _complete(store, first[0].id)
    assert len(store.claim("limited", 10, "w3")) == 1


def test_a_limit_counts_only_its_own_queue(store: Store) -> None:
    store.enqueue([new_job("limited") for _ in range(3)] + [new_job("free") for _ in range(5)])
    store.set_queue_limit("limited", 1)

    assert len(store.claim("free", 10, "w")) == 5
    assert len(store.claim("limited", 10, "w")) == 1


def test_requeued_jobs_give_their_slots_back(store: Store) -> None:
    store.enqueue([new_job("limited") for _ in range(4)])
    store.set_queue_limit("limited", 2)
    held = store.claim("limited", 10, "w1")
    assert len(held) == 2

    assert store.requeue([(held[0].id, held[0].attempt)]) == 1

    assert len(store.claim("limited", 10, "w2")) == 1


def test_a_limit_of_zero_runs_nothing_and_none_restores_the_full_claim(
    store: Store, db: Db
) -> None:
    store.enqueue([new_job("limited") for _ in range(6)])
    store.set_queue_limit("limited", 0)
    assert store.claim("limited", 10, "w") == []

    store.set_queue_limit("limited", None)

    assert db.scalar("SELECT concurrency_limit FROM job_queues WHERE name = 'limited'") is None
    assert len(store.claim("limited", 10, "w")) == 6


def test_a_claimer_that_saw_the_queue_unlimited_obeys_a_limit_set_later(
    make_store: Callable[..., Store],
) -> None:
    # Two stores: the worker's, which has claimed from the queue before, and the
    # operator's. The worker learns of the limit from the database, not a restart.
    worker, operator = make_store(), make_store()
    worker.enqueue([new_job("q") for _ in range(8)])
    assert len(worker.claim("q", 2, "w")) == 2

    operator.set_queue_limit("q", 3)
    assert len(worker.claim("q", 10, "w")) == 1

    operator.set_queue_limit("q", None)
    assert len(worker.claim("q", 10, "w")) == 5


def test_setting_a_limit_below_what_runs_stops_claims_until_enough_finish(
    store: Store,
) -> None:
    store.enqueue([new_job("q") for _ in range(6)])
    held = store.claim("q", 4, "w")
    store.set_queue_limit("q", 2)

    assert store.claim("q", 10, "w") == []
    for job in held[:2]:
        _complete(store, job.id)
    assert store.claim("q", 10, "w") == []
    _complete(store, held[2].id)
    assert len(store.claim("q", 10, "w")) == 1


def test_set_queue_limit_refuses_unknown_queues_and_negative_limits(store: Store) -> None:
    store.ensure_queues(["q"])
    with pytest.raises(UnknownQueue, match="'nope'"):
        store.set_queue_limit("nope", 2)
    with pytest.raises(ConfigurationError, match="-1"):
        store.set_queue_limit("q", -1)
    assert store.queue("q")["concurrency_limit"] is None


def test_finishing_a_job_of_a_limited_queue_wakes_the_workers(
    store: Store, listener: Listener, database_url: str
) -> None:
    store.enqueue([new_job("limited") for _ in range(3)] + [new_job("free")])
    store.set_queue_limit("limited", 1)
    (limited,) = store.claim("limited", 10, "w")
    (free,) = store.claim("free", 10, "w")
    notifications_up_to_marker(listener, database_url, store.channel)  # drop earlier ones

    _complete(store, free.id)
    _complete(store, limited.id)

    # Only the limited queue's finish says so: an unlimited queue's workers never wait.
    assert notifications_up_to_marker(listener, database_url, store.channel) == ["limited"]


def test_a_finish_in_a_limited_queue_with_free_slots_wakes_nobody(
    store: Store, listener: Listener, database_url: str
) -> None:
    # Nobody waits for a queue that is not full: no NOTIFY per task.
    store.enqueue([new_job("limited") for _ in range(3)])
    store.set_queue_limit("limited", 5)
    held = store.claim("limited", 2, "w")
    notifications_up_to_marker(listener, database_url, store.channel)

    _complete(store, held[0].id)

    assert notifications_up_to_marker(listener, database_url, store.channel) == []


def test_a_result_written_by_the_backend_wakes_the_workers_of_a_limited_queue(
    store: Store, listener: Listener, database_url: str
) -> None:
    store.enqueue([new_job("limited") for _ in range(2)])
    store.set_queue_limit("limited", 1)
    (job,) = store.claim("limited", 10, "w")
    notifications_up_to_marker(listener, database_url, store.channel)

    success = StateWrite(
        job_id=job.id,
        status=JobStatus.COMPLETED,
        log_status=LogStatus.SUCCESS,
        document={"status": "SUCCESS", "result": 1},
        ready=True,
        attempt=job.attempt,
        transport_owned=True,
        queue_name="limited",
    )
    assert store.write_state(success, notify=True)

    assert notifications_up_to_marker(listener, database_url, store.channel) == ["limited"]


LIMIT, CLAIMERS, JOBS = 3, 8, 300


def test_racing_claimers_on_their_own_connections_never_exceed_the_limit(
    make_store: Callable[..., Store], database_url: str
) -> None:
    """Each claimer holds what it got for a moment, then finishes it: the running count,
    seen by the claimers themselves and by a watcher polling the table, stays <= LIMIT."""
    setup = make_store()
    setup.enqueue([new_job("race") for _ in range(JOBS)])
    setup.set_queue_limit("race", LIMIT)
    held = 0  # jobs returned by a claim whose finish has not begun: all of them running
    most_held = 0
    guard = threading.Lock()
    done = threading.Event()
    start = threading.Barrier(CLAIMERS + 1)

    def count(conn: psycopg.Connection[Any], status: str) -> int:
        row = conn.execute("SELECT count(*) FROM jobs WHERE status = %s", (status,)).fetchone()
        return int(row[0]) if row else 0

    def claimer(n: int) -> int:
        nonlocal held, most_held
        store = make_store()
        rng = random.Random(n)
        finished = 0
        with psycopg.connect(database_url, autocommit=True) as conn:
            start.wait(timeout=30)
            while True:
                batch = store.claim("race", rng.randint(1, 4), f"w{n}")
                if not batch:
                    if count(conn, "queued") == 0:
                        return finished
                    continue
                with guard:
                    held += len(batch)
                    most_held = max(most_held, held)
                time.sleep(rng.uniform(0, 0.003))
                for job in batch:
                    with guard:
                        held -= 1
                    _complete(store, job.id, job.attempt)
                    finished += 1

    def watcher() -> int:
        most = 0
        with psycopg.connect(database_url, autocommit=True) as conn:
            start.wait(timeout=30)
            while not done.is_set():
                most = max(most, count(conn, "running"))
        return most

    with ThreadPoolExecutor(CLAIMERS + 1) as pool:
        watching = pool.submit(watcher)
        try:
            per_claimer = list(pool.map(claimer, range(CLAIMERS), timeout=120))
        finally:
            done.set()
        watched = watching.result()

    assert sum(per_claimer) == JOBS
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert count(conn, "completed") == JOBS
    assert most_held <= LIMIT
    assert watched <= LIMIT
    assert sum(1 for n in per_claimer if n) > 1  # the race really happened
