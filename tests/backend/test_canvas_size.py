"""Canvases are not payloads: Celery's bookkeeping has its own, larger cap.

``max_payload_bytes`` guards what a task carries (args, kwargs, the caller's headers);
the rest of a chain, chord and callback signatures ride in the message under
``max_canvas_bytes``. Real workers, the pgqueue broker and backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from celery import group, signals

from celery_pgqueue.errors import CanvasTooLarge, PayloadTooLarge

from .conftest import Tasks, rows, running_worker

pytestmark = pytest.mark.worker


def _count_jobs(tasks: Tasks) -> int:
    [(count,)] = rows(tasks.database_url, "SELECT count(*) FROM jobs")
    return int(count)


@pytest.mark.slow
def test_a_chain_into_a_1000_task_chord_runs(backend_tasks: Callable[..., Tasks]) -> None:
    """Celery's test_chain_to_a_chord_with_large_header: a 230 KB canvas, tiny data."""
    t = backend_tasks()
    sizes: list[int] = []

    def measure(body: Any = None, **_: Any) -> None:
        sizes.append(len(json.dumps(body[2])))

    signals.before_task_publish.connect(measure, weak=False)
    try:
        workflow = t.echo.si(1) | group(t.echo.s() for _ in range(1000)) | t.tsum.s()
        with running_worker(t.app, concurrency=8):
            result = workflow.delay()
            assert result.get(timeout=120) == 1000
    finally:
        signals.before_task_publish.disconnect(measure)
    assert sizes[0] > 65_536, "the first message's canvas alone is over max_payload_bytes"


def test_a_canvas_over_its_cap_is_refused_at_the_producer(
    backend_tasks: Callable[..., Tasks],
) -> None:
    t = backend_tasks(broker_transport_options={"max_canvas_bytes": 8_192})
    workflow = t.echo.si(1) | group(t.echo.s() for _ in range(100)) | t.tsum.s()

    with pytest.raises(CanvasTooLarge) as caught:
        workflow.delay()
    text = str(caught.value)
    assert "8,192-byte limit" in text and "max_canvas_bytes" in text and "t.echo" in text
    assert isinstance(caught.value, PayloadTooLarge), "one except clause catches both"
    assert _count_jobs(t) == 0, "nothing written"


def test_the_data_limit_still_holds_for_a_task_in_a_canvas(
    backend_tasks: Callable[..., Tasks],
) -> None:
    t = backend_tasks(broker_transport_options={"max_payload_bytes": 4_096})
    workflow = t.echo.si("x" * 5_000) | group(t.echo.s() for _ in range(100))

    with pytest.raises(PayloadTooLarge) as caught:
        workflow.delay()
    assert not isinstance(caught.value, CanvasTooLarge)
    assert "4,096-byte limit" in str(caught.value) and "max_payload_bytes" in str(caught.value)
    assert _count_jobs(t) == 0


def test_an_oversized_message_mid_chain_fails_the_task_and_every_waiter(
    backend_tasks: Callable[..., Tasks],
) -> None:
    """The worker's publish of the next step is refused: no get() on the chain hangs."""
    t = backend_tasks(broker_transport_options={"max_payload_bytes": 16_384})
    workflow = t.big.s(20_000) | t.echo.s() | group(t.echo.s(), t.echo.s())

    with running_worker(t.app):
        result = workflow.delay()
        with pytest.raises(PayloadTooLarge, match="16,384-byte limit"):
            result.get(timeout=15)
        for member in result.results:
            with pytest.raises(PayloadTooLarge):
                member.get(timeout=10)
    [(message,)] = rows(
        t.database_url, "SELECT last_error_message FROM jobs WHERE attempt_count = 1"
    )
    assert message.startswith("PayloadTooLarge: task 't.echo'"), "t.big ran and failed"


def test_a_canvas_over_the_workers_cap_mid_chain_fails_with_its_name(
    backend_tasks: Callable[..., Tasks],
) -> None:
    """A worker with a smaller max_canvas_bytes than the producer's refuses the next step."""
    producer = backend_tasks(task_default_queue="shared")
    worker = backend_tasks(
        task_default_queue="shared", broker_transport_options={"max_canvas_bytes": 4_096}
    )
    workflow = producer.echo.si(1) | producer.echo.s() | group(producer.echo.s() for _ in range(50))

    with running_worker(worker.app):
        result = workflow.delay()
        with pytest.raises(CanvasTooLarge, match="max_canvas_bytes"):
            result.get(timeout=15)
        for member in result.results:
            with pytest.raises(CanvasTooLarge):
                member.get(timeout=10)
