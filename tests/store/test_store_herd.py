"""What the herd fix asks of the store: a claim's "drained" note, and turns.

A claim given a ``drained`` payload NOTIFYs it with its own commit when it takes fewer
jobs than it asked for (the queue is empty as far as its snapshot saw), and not when
it takes a full batch; the note ends with when the claim began, on the database's
clock. A look-up of due times NOTIFYs its answer for the queues it is told to.
``take_turn`` gives one caller per period the turn, whoever asks, and its row never
shows among the metrics' totals.
"""

from __future__ import annotations

import time

from store_factories import Db, heard, new_job

from celery_pgqueue.store import Store
from celery_pgqueue.store import metrics as counters
from celery_pgqueue.store.listener import (
    Listener,
    claim_note_prefix,
    drained_note,
    drained_payload,
    due_payload,
    wake_note,
)


def test_a_short_claim_notifies_its_drained_note_and_a_full_one_does_not(
    store: Store, listener: Listener, db: Db
) -> None:
    store.enqueue([new_job() for _ in range(3)])
    heard(listener, store)  # the publish's own wake-up
    prefix = claim_note_prefix("default", "host:1:abc")

    assert len(store.claim("default", 2, "w", drained=prefix)) == 2
    assert heard(listener, store) == []
    before = db.now().timestamp()
    assert len(store.claim("default", 2, "w", drained=prefix)) == 1
    (first,) = heard(listener, store)
    assert store.claim("default", 2, "w", drained=prefix) == []
    (second,) = heard(listener, store)
    after = db.now().timestamp()
    assert store.claim("default", 2, "w") == []  # no payload: nothing sent
    assert heard(listener, store) == []

    notes = [drained_note(first), drained_note(second)]
    assert [note[:2] for note in notes if note] == [("default", "host:1:abc")] * 2
    began = [note[2] for note in notes if note]
    assert before <= began[0] <= began[1] <= after, "when each claim began, database clock"


def test_drained_notes_parse_apart_from_queue_names() -> None:
    assert drained_note(drained_payload("q", "host:1:abc")) == ("q", "host:1:abc", None)
    assert drained_note(claim_note_prefix("q", "w") + "1733363412.25") == ("q", "w", 1733363412.25)
    assert drained_note(drained_payload("q", "")) == ("q", "", None)
    assert drained_note("q") is None
    assert drained_note("q\x1f2.5") is None
    assert drained_note(due_payload("q", 1733363412.25, 2.5)) is None


def test_due_notes_say_when_and_read_as_no_queue_to_earlier_versions() -> None:
    assert wake_note(due_payload("q", 1733363412.25, 2.5)) == ("q", 2.5, 1733363412.25)
    assert wake_note(due_payload("q", None, None)) == ("q", float("inf"), None)
    assert wake_note("q\x1f2.5") == ("q", 2.5, None), "a publish's note has no run_at"
    assert wake_note("q") == ("q", None, None)
    # How a worker of the previous version reads them: a scheduled job of a queue whose
    # name ends in the epoch mark and a number, which it does not consume.
    for payload in (due_payload("q", 1733363412.25, 2.5), due_payload("q", None, None)):
        queue, _, seconds = payload.rpartition("\x1f")
        assert queue != "q" and float(seconds) >= 0


def test_a_look_up_of_due_times_tells_the_queues_it_is_asked_to(
    store: Store, listener: Listener, db: Db
) -> None:
    store.enqueue([new_job("a", delay_seconds=60), new_job("b", delay_seconds=30)])
    heard(listener, store)

    answer = store.next_due(["a", "b", "c"], tell=["a", "c"])
    assert sorted(answer) == ["a", "b"]
    assert 59 < answer["a"][0] <= 60 and 29 < answer["b"][0] <= 30
    assert abs(answer["a"][1] - (db.now().timestamp() + answer["a"][0])) < 1.0
    told = {wake_note(payload)[0]: wake_note(payload) for payload in heard(listener, store)}
    assert sorted(told) == ["a", "c"], "only the queues asked, with or without a job"
    assert told["a"][2] == answer["a"][1] and 59 < told["a"][1] <= 60
    assert told["c"][1:] == (float("inf"), None), "no job scheduled"
    assert store.next_due(["a", "b"]) and heard(listener, store) == []


def test_one_turn_per_period_whoever_asks(store: Store, make_store) -> None:  # type: ignore[no-untyped-def]
    other = make_store()
    assert store.take_turn("maintenance", 0.5) is True
    assert other.take_turn("maintenance", 0.5) is False
    assert store.take_turn("maintenance", 0.5) is False
    time.sleep(0.6)
    assert other.take_turn("maintenance", 0.5) is True
    assert store.take_turn("other purpose", 0.5) is True
    assert all(not c.counter.startswith("turn:") for c in counters.snapshot(store).counters)
