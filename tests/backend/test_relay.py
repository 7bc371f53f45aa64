"""The relay between a pool process and its node's completion writer, without Celery."""

from __future__ import annotations

import os
import threading
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


@pytest.fixture
def writer() -> Iterator[tuple[CompletionWriter, Recording]]:
    store = Recording()
    # Owned by our parent, as a pool process's writer is owned by the worker's main process.
    w = CompletionWriter(store, notify=True, owner=os.getppid())
    thread = threading.Thread(target=w.serve, daemon=True)
    thread.start()
    yield w, store
    w.stopping.set()
    thread.join(5)


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
