"""Queues: names are values (any text of 1-100 characters), created on first use,
paused and resumed, bound to exchanges, kept alive by consumers, deleted."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from store_factories import Db, new_job

from celery_pgqueue.errors import InvalidQueueName, UnknownQueue
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import Store

ODD_NAMES = [
    "it's",
    '"quoted"',
    "a; DROP TABLE jobs; --",
    "очередь-ñ-队列-🚀",
    "q" * 100,
    " spaced  out ",
    "%(name)s %s $1",
]


@pytest.mark.parametrize("name", ["", "q" * 101, "nul\x00byte"])
def test_ensure_queues_refuses_names_that_do_not_fit(store: Store, db: Db, name: str) -> None:
    with pytest.raises(InvalidQueueName, match="1 to 100 characters"):
        store.ensure_queues([name])
    with pytest.raises(InvalidQueueName):
        store.enqueue([new_job(name)])

    assert db.scalar("SELECT count(*) FROM job_queues") == 0


def test_invalid_queue_name_is_a_value_error(store: Store) -> None:
    with pytest.raises(ValueError):
        store.ensure_queues([""])


@pytest.mark.parametrize("name", ODD_NAMES)
def test_any_text_is_a_queue_name_stored_as_a_value(store: Store, db: Db, name: str) -> None:
    job = new_job(name)

    store.enqueue([job])

    assert db.scalar("SELECT name FROM job_queues") == name
    assert store.queue_exists(name)
    assert store.count_waiting(name) == 1
    assert [c.id for c in store.claim(name, 1, "worker")] == [job.id]
    assert db.scalar("SELECT count(*) FROM jobs") == 1


def test_ensure_queues_keeps_an_existing_queues_settings(
    make_store: Callable[..., Store], db: Db
) -> None:
    first = make_store(default_priority=5)
    first.ensure_queues(["q"])
    first.set_queue_active("q", False)

    make_store(default_priority=99).ensure_queues(["q"])

    assert db.all("SELECT default_priority, is_active FROM job_queues") == [(5, False)]


def test_queue_and_queues_read_back_the_settings(store: Store) -> None:
    store.ensure_queues(["b", "a"])
    store.set_queue_priority("a", 3)
    store.set_queue_active("b", False)

    assert store.queue("a")["default_priority"] == 3
    assert [(q["name"], q["default_priority"], q["is_active"]) for q in store.queues()] == [
        ("a", 3, True),
        ("b", 100, False),
    ]


def test_settings_of_an_unknown_queue_raise_unknown_queue(store: Store) -> None:
    with pytest.raises(UnknownQueue, match="nope"):
        store.queue("nope")
    with pytest.raises(UnknownQueue):
        store.set_queue_active("nope", False)
    with pytest.raises(UnknownQueue):
        store.set_queue_priority("nope", 1)


def test_queue_created_in_a_rolled_back_transaction_is_created_again(store: Store, db: Db) -> None:
    with store.engine.connect() as conn:
        with conn.begin() as transaction:
            store.enqueue([new_job("first-use")], conn=conn)
            transaction.rollback()

    store.enqueue([new_job("first-use")])

    assert db.scalar("SELECT count(*) FROM jobs WHERE queue_name = 'first-use'") == 1


# -- bindings -----------------------------------------------------------------------


def test_bind_records_a_binding_once_and_declares_its_queue(store: Store) -> None:
    store.bind("celery.pidbox", "fanout", "", "mailbox-1")
    store.bind("celery.pidbox", "fanout", "", "mailbox-1")
    store.bind("celery.pidbox", "fanout", "", "mailbox-2")
    store.bind("celeryev", "topic", "worker.#", "events")

    assert store.queue_exists("mailbox-1")
    assert store.binding_table("celery.pidbox") == [
        ("fanout", "", "mailbox-1"),
        ("fanout", "", "mailbox-2"),
    ]
    assert store.binding_table("celeryev") == [("topic", "worker.#", "events")]
    assert store.binding_table("nothing-bound") == []


def test_unbind_forgets_one_binding(store: Store) -> None:
    store.bind("ex", "direct", "a", "q")
    store.bind("ex", "direct", "b", "q")

    store.unbind("ex", "a", "q")

    assert store.binding_table("ex") == [("direct", "b", "q")]
    assert store.queue_exists("q")


def test_touch_queues_pushes_the_queues_expiry_forward(store: Store, db: Db) -> None:
    store.ensure_queues(["reply", "other"])

    with store.engine.begin() as conn:
        now = conn.exec_driver_sql("SELECT now()").scalar_one()
    store.touch_queues([("reply", 120.0)])

    expires_at = db.scalar("SELECT expires_at FROM job_queues WHERE name = 'reply'")
    assert timedelta(seconds=120) <= expires_at - now < timedelta(seconds=130)
    assert db.scalar("SELECT expires_at FROM job_queues WHERE name = 'other'") is None


def test_delete_queue_drops_queue_waiting_jobs_and_bindings(store: Store, db: Db) -> None:
    store.bind("ex", "direct", "rk", "doomed")
    store.enqueue([new_job("doomed"), new_job("doomed"), new_job("kept")])

    assert store.delete_queue("doomed")

    assert not store.queue_exists("doomed")
    assert store.binding_table("ex") == []
    assert db.scalar("SELECT count(*) FROM jobs WHERE queue_name = 'doomed'") == 0
    assert store.count_waiting("kept") == 1


def test_deleted_queue_is_created_again_on_next_use(store: Store, db: Db) -> None:
    store.enqueue([new_job("again")])
    store.delete_queue("again")

    store.enqueue([new_job("again")])

    assert store.queue_exists("again")
    assert store.count_waiting("again") == 1


def test_delete_queue_keeps_a_queue_whose_jobs_still_run_or_keep_results(
    store: Store, db: Db
) -> None:
    running, done, waiting = new_job("busy"), new_job("busy"), new_job("busy")
    store.enqueue([running, done])
    claimed = {c.id: c for c in store.claim("busy", 2, "worker")}
    store.finish(
        done.id,
        attempt=claimed[done.id].attempt,
        status=JobStatus.COMPLETED,
        log_status=LogStatus.SUCCESS,
    )
    store.enqueue([waiting])

    assert not store.delete_queue("busy")

    assert store.queue_exists("busy")
    assert {r[0] for r in db.all("SELECT id FROM jobs")} == {running.id, done.id}


def test_queue_exists_is_false_for_an_undeclared_queue(store: Store) -> None:
    assert not store.queue_exists("undeclared")
