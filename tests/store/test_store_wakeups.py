"""Fewer wake-ups from a fast producer, none lost (store.wakeups, #17.5).

A process's publish of due jobs notifies in its own commit unless this process
notified that queue within the window; such a publish commits without a NOTIFY and is
owed one, sent once the window has passed, or at interpreter exit. Every committed job
is followed by a NOTIFY naming its queue. The window is widened here (``min_window``)
so that "not yet" and "then" are seconds apart, not milliseconds.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
import time

from store_factories import heard, new_job

from celery_pgqueue.store import Store
from celery_pgqueue.store.listener import Listener

WINDOW = 1.0


def _next_payload(listener: Listener, channel: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ch, payload in listener.wait(0.05):
            if ch == channel:
                return payload
    return None


def test_a_publish_within_the_window_is_woken_when_the_window_ends(
    store: Store, listener: Listener
) -> None:
    store.wakeups().min_window = WINDOW
    store.enqueue([new_job()])
    assert heard(listener, store) == ["default"]  # the first notifies in its commit

    owed_at = time.monotonic()
    store.enqueue([new_job()])
    assert heard(listener, store) == []  # committed without one: owed

    assert _next_payload(listener, store.channel, timeout=5 * WINDOW) == "default"
    assert time.monotonic() - owed_at >= 0.5 * WINDOW
    assert heard(listener, store) == []  # paid once


def test_each_queue_keeps_its_own_window(store: Store, listener: Listener) -> None:
    store.wakeups().min_window = WINDOW
    store.enqueue([new_job("a")])
    store.enqueue([new_job("b")])
    assert heard(listener, store) == ["a", "b"]


def test_a_scheduled_job_always_notifies_in_its_commit(store: Store, listener: Listener) -> None:
    store.wakeups().min_window = WINDOW
    store.enqueue([new_job()])
    store.enqueue([new_job(delay_seconds=60)])
    payloads = heard(listener, store)
    # the due job's wake-up, then the scheduled one's note saying when it comes due
    assert payloads[0] == "default"
    assert len(payloads) == 2 and payloads[1].startswith("default") and payloads[1] != "default"


def test_a_group_notifies_its_queue_once(store: Store, listener: Listener) -> None:
    store.enqueue([new_job() for _ in range(50)] + [new_job("other") for _ in range(50)])
    assert sorted(heard(listener, store)) == ["default", "other"]


def test_what_is_owed_is_sent_when_the_producer_exits(
    store: Store, listener: Listener, database_url: str
) -> None:
    script = textwrap.dedent(
        f"""
        import uuid
        from celery_pgqueue.store import NewJob, Store
        store = Store({database_url!r})
        store.wakeups().min_window = 60.0
        for _ in range(2):
            store.enqueue([NewJob(id=uuid.uuid4(), queue_name="default", payload={{}})])
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    # one in the first commit, the debt of the second paid at exit, not 60 s later
    assert heard(listener, store) == ["default", "default"]


def _publish_twice_and_exit(database_url: str) -> None:
    store = Store(database_url)
    store.wakeups().min_window = 60.0
    store.enqueue([new_job()])
    store.enqueue([new_job()])


def test_what_a_multiprocessing_child_owes_is_sent_when_it_exits(
    store: Store, listener: Listener, database_url: str
) -> None:
    # multiprocessing ends its children with os._exit, past the atexit hooks
    child = multiprocessing.get_context("fork").Process(
        target=_publish_twice_and_exit, args=(database_url,)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert heard(listener, store) == ["default", "default"]


def test_a_producer_publishing_fast_holds_one_connection(store: Store) -> None:
    # The debts are paid on a connection nobody is using: the thread pays only once
    # the producer has been idle for a window, so no publish is waiting on the pool.
    for _ in range(300):
        store.enqueue([new_job()])
    time.sleep(0.2)  # every debt paid
    pool = store.engine.pool
    assert pool.checkedout() == 0
    assert pool.checkedin() == 1
