"""Whose clock? The database's: a worker's or producer's own clock never decides.

Celery carries time as absolute ISO timestamps taken from the sending process's clock
(``countdown`` becomes ``eta = now + countdown``, ``expires`` likewise), and its worker
compares them with its own clock. Here every such time becomes an interval on the
clock of the process that took it, added to the database's ``now()`` when the row is
written; the worker then runs what the database says is due, and checks expiry
against the database's answer. Two processes whose clocks disagree by minutes still
agree on every ``run_at``, expiry and duration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery import signals

from celery_pgqueue import delivery


def parse_time(value: Any) -> datetime | None:
    """An ISO timestamp (or datetime) from a message header, timezone-aware (UTC if naive)."""
    if not value:
        return None
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def seconds_until(value: Any) -> float | None:
    """How far ``value`` (ISO timestamp or datetime) is ahead of this process's clock.

    The interval the sender meant: its ``countdown`` back from the absolute ``eta``
    Celery computed with this same clock. Negative when past; None when absent.
    """
    moment = parse_time(value)
    if moment is None:
        return None
    return (moment - datetime.now(UTC)).total_seconds()


def _run_when_delivered(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    """A task the pgqueue transport delivered is due by the database's clock: run it now.

    Celery's worker holds a task whose ``eta`` is ahead of its own clock in a timer; a
    worker whose clock is behind the database's (or the producer's) would hold a due
    task that long. Its scheduling copy of the eta is clamped to the worker's now, so
    the timer fires at once; the message keeps the ``eta`` that was sent, which is what
    the task sees in ``self.request.eta`` (as on Redis) and, unless clamped, what the
    ``task-received`` event reports. ``task_received`` is sent after the request is
    built and before the worker looks at its eta.
    """
    message = getattr(request, "message", None)
    properties = getattr(message, "properties", None) or {}
    eta = getattr(request, "_eta", None)
    if delivery.JOB not in properties or not isinstance(eta, datetime):
        return
    now = datetime.now(eta.tzinfo)
    if eta > now:
        request._eta = now


signals.task_received.connect(_run_when_delivered, weak=False)
