"""What the herd fix asks of the store: a claim's "drained" note, and turns.

A claim given a ``drained`` payload NOTIFYs it with its own commit when it takes fewer
jobs than it asked for (the queue is empty as far as its snapshot saw), and not when
it takes a full batch. ``take_turn`` gives one caller per period the turn, whoever
asks, and its row never shows among the metrics' totals.
"""

from __future__ import annotations

import time

from store_factories import heard, new_job

from celery_pgqueue.store import Store
from celery_pgqueue.store import metrics as counters
from celery_pgqueue.store.listener import Listener, drained_note, drained_payload


def test_a_short_claim_notifies_its_drained_note_and_a_full_one_does_not(
    store: Store, listener: Listener
) -> None:
    store.enqueue([new_job() for _ in range(3)])
    heard(listener, store)  # the publish's own wake-up
    note = drained_payload("default", "host:1:abc")

    assert len(store.claim("default", 2, "w", drained=note)) == 2
    assert heard(listener, store) == []
    assert len(store.claim("default", 2, "w", drained=note)) == 1
    assert heard(listener, store) == [note]
    assert store.claim("default", 2, "w", drained=note) == []
    assert heard(listener, store) == [note]
    assert store.claim("default", 2, "w") == []  # no payload: nothing sent
    assert heard(listener, store) == []


def test_drained_notes_parse_apart_from_queue_names() -> None:
    assert drained_note(drained_payload("q", "host:1:abc")) == ("q", "host:1:abc")
    assert drained_note(drained_payload("q", "")) == ("q", "")
    assert drained_note("q") is None
    assert drained_note("q\x1f2.5") is None


def test_one_turn_per_period_whoever_asks(store: Store, make_store) -> None:  # type: ignore[no-untyped-def]
    other = make_store()
    assert store.take_turn("maintenance", 0.5) is True
    assert other.take_turn("maintenance", 0.5) is False
    assert store.take_turn("maintenance", 0.5) is False
    time.sleep(0.6)
    assert other.take_turn("maintenance", 0.5) is True
    assert store.take_turn("other purpose", 0.5) is True
    assert all(not c.counter.startswith("turn:") for c in counters.snapshot(store).counters)
