"""The relay between a pool process and its node's completion writer, without Celery."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_pgqueue import relay
from celery_pgqueue.completions import CompletionWriter
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store.batches import Finish


class Recording:
    """A store that records the batches it is asked to write."""

    def __init__(self) -> None:
        self.batches: list[list[Finish]] = []

    def retrying(self, write: Any, *, what: str) -> Any:
        return write()

    def finish_many(self, finishes: list[Finish], *, notify: bool) -> set[uuid.UUID]:
        self.batches.append(list(finishes))
        return {f.job_id for f in finishes}


def _finish() -> Finish:
    return Finish(
        job_id=uuid.uuid4(),
        attempt=1,
        status=JobStatus.COMPLETED,
        log_status=LogStatus.SUCCESS,
        result={"status": "SUCCESS", "result": [1, "two"]},
        notify=True,
    )


@contextlib.contextmanager
def serving(w: CompletionWriter) -> Iterator[CompletionWriter]:
    """``w`` serving in a thread of this process (in a worker, a process of its own)."""
    thread = threading.Thread(target=w.serve, daemon=True)
    thread.start()
    try:
        yield w
    finally:
        w.stopping.set()
        thread.join(5)


@pytest.fixture
def writer() -> Iterator[tuple[CompletionWriter, Recording]]:
    store = Recording()
    # Owned by our parent, as a pool process's writer is owned by the worker's main process.
    with serving(CompletionWriter(store, notify=True, owner=os.getppid())) as w:
        yield w, store


def test_a_finish_sent_is_written_and_acknowledged(
    writer: tuple[CompletionWriter, Recording],
) -> None:
    w, store = writer
    finish = _finish()

    assert relay.RelayClient(w.endpoint).send(finish) is True
    assert store.batches == [[finish]], "the writer wrote exactly what was sent"


def test_a_datagram_without_the_nodes_token_is_never_written() -> None:
    data = relay.encode("not-the-token", 1, _finish())

    assert relay.decode(data, "the-token") is None
    assert relay.decode(b"\x80\x04 not json", "the-token") is None
    assert relay.decode(relay.encode_stop("not-the-token"), "the-token") is None
    assert relay.decode(relay.encode_stop("the-token"), "the-token") == relay.STOP


def test_without_a_writer_the_pool_process_writes_its_finish_itself() -> None:
    gone = relay.Endpoint(b"\0celery-pgqueue-test-nobody", "token", os.getppid())

    assert relay.RelayClient(gone).send(_finish()) is None


def test_a_finish_too_large_for_one_datagram_is_written_by_the_pool_process(
    writer: tuple[CompletionWriter, Recording],
) -> None:
    w, store = writer
    large = Finish(
        job_id=uuid.uuid4(),
        attempt=1,
        status=JobStatus.COMPLETED,
        log_status=LogStatus.SUCCESS,
        result={"status": "SUCCESS", "result": "x" * (relay.MAX_DATAGRAM + 1)},
    )

    assert relay.RelayClient(w.endpoint).send(large) is None
    assert store.batches == []


def _send_in_thread(client: relay.RelayClient, finish: Finish) -> tuple[threading.Thread, dict]:
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("sent", client.send(finish)))
    thread.start()
    return thread, outcome


def test_a_finish_lost_with_a_dead_writer_reaches_the_one_started_in_its_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay, "RESEND_AFTER", 0.2)
    store = Recording()
    w = CompletionWriter(store, notify=True, owner=os.getppid())
    finish = _finish()
    thread, outcome = _send_in_thread(relay.RelayClient(w.endpoint), finish)
    # The writer dies holding the finish: read, never answered, its socket gone.
    assert select.select([w.sock], [], [], 5)[0], "the finish never reached the writer"
    w.sock.recv(relay.MAX_DATAGRAM + 1024)
    w.sock.close()
    # Its replacement binds the same address (as the main process's watcher does).
    w.sock = w._bind()
    with serving(w):
        thread.join(5)
    assert outcome.get("sent") is True, "the pool process got no answer"
    assert store.batches == [[finish]]


class Slow(Recording):
    def finish_many(self, finishes: list[Finish], *, notify: bool) -> set[uuid.UUID]:
        time.sleep(0.6)
        return super().finish_many(finishes, notify=notify)


def test_a_finish_sent_again_while_the_writer_holds_it_is_written_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay, "RESEND_AFTER", 0.1)
    store = Slow()
    finish = _finish()
    with serving(CompletionWriter(store, notify=True, owner=os.getppid())) as w:
        assert relay.RelayClient(w.endpoint).send(finish) is True
        time.sleep(0.8)  # any copy the writer kept would be written by now
    assert store.batches == [[finish]], "a copy sent while it was written was kept"
