"""Kombu message <-> ``jobs`` row: the row a publish becomes, the message a claim delivers.

A delivered message carries its row's ``(job id, attempt)`` in its properties
(``pgqueue_job``, ``pgqueue_attempt``): the fence every later ack, reject or renewal
writes under. Celery tasks (protocol 2 headers, or a protocol 1 JSON body) keep their
row as history under their id; other messages are deleted once consumed.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from celery_pgqueue import clock, delivery, unique
from celery_pgqueue.errors import ConfigurationError, InvalidPayload
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.payload import from_payload, to_payload
from celery_pgqueue.store import ClaimedJob, NewJob
from celery_pgqueue.transport.routing import is_celery_transient


def _tag(job_id: uuid.UUID, attempt: int) -> str:
    return f"{job_id}:{attempt}"


def _properties(message: Any) -> dict[str, Any]:
    props = message.properties if hasattr(message, "properties") else message["properties"]
    return props if isinstance(props, dict) else {}


def is_task_delivery(message: Any) -> bool:
    """Whether a delivered message is a Celery task (kept as history when acked)."""
    flag = _properties(message).get("pgqueue_task")
    if flag is not None:
        return bool(flag)
    headers = message.headers if hasattr(message, "headers") else message.get("headers")
    return is_task(headers)


def held_of(message: Any) -> tuple[uuid.UUID, int]:
    """``(job id, attempt)`` of a delivered message: the fence for every later write."""
    props = _properties(message)
    return uuid.UUID(props[delivery.JOB]), int(props[delivery.ATTEMPT])


def is_task(headers: Any) -> bool:
    """A Celery task message of protocol 2: name and id in the headers."""
    return isinstance(headers, dict) and "task" in headers and "id" in headers


def task_fields(headers: Any, body: Any) -> dict[str, Any] | None:
    """The fields naming a Celery task (``task``, ``id``, ``eta``, ``retries``), if it is one.

    Protocol 2 carries them in the headers; protocol 1 (``task_protocol=1``) in the
    body, readable when it is JSON. Tasks keep their row as history under their id;
    other messages are deleted once consumed.
    """
    if is_task(headers):
        return dict(headers)
    if is_task(body) and not (isinstance(headers, dict) and "task" in headers):
        return dict(body)
    return None


def _stored_body(payload: Any) -> Any:
    """The body of a stored payload when it is JSON kept readable, else None."""
    if isinstance(payload, dict) and payload.get("body_encoding") == "json":
        return payload.get("body")
    return None


def new_job(
    queue: str, message: dict[str, Any], options: PgQueueOptions, *, shared: bool = False
) -> NewJob:
    """The row for ``message`` in ``queue``: size-checked, readable JSON payload."""
    headers = message.get("headers") or {}
    properties = message.get("properties") or {}
    document, _ = to_payload(
        message, limit=options.max_payload_bytes, canvas_limit=options.max_canvas_bytes
    )
    task = task_fields(headers, _stored_body(document))
    if task:
        job_id = job_id_for(task["id"])
        if shared:  # one task sent to several queues: one row each
            job_id = uuid.uuid5(job_id, queue)
    else:
        job_id = uuid.uuid4()
    ttl: float | None = None
    expiration = properties.get("expiration")
    if expiration not in (None, ""):
        try:
            ttl = max(0.0, float(expiration) / 1000.0)
        except (TypeError, ValueError):
            ttl = None
    delay: float | None = None
    exchange = (properties.get("delivery_info") or {}).get("exchange") or ""
    if task:
        # Celery sends absolute times from this process's clock: back to intervals
        # on the same clock, which the database adds to its own now().
        delay = clock.seconds_until(task.get("eta"))
        if ttl is None and (left := clock.seconds_until(task.get("expires"))) is not None:
            ttl = max(0.0, left)
    elif is_celery_transient(queue, exchange):
        ttl = min(ttl, options.message_ttl) if ttl is not None else options.message_ttl
    priority = properties.get("priority")
    if priority is not None:
        try:
            priority = int(priority)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"message priority must be an integer, got {priority!r}"
            ) from None
    key = properties.get(unique.PROPERTY)
    if key is not None:
        if not task or not isinstance(key, str) or not key:
            raise ConfigurationError(
                f"unique_key {key!r}: only a Celery task message takes one, as a non-empty "
                "string (task.apply_async(..., unique_key='order-42'))"
            )
        key = unique.stored_key(str(task.get("task")), key)
    return NewJob(
        id=job_id,
        queue_name=queue,
        payload=document,
        priority=priority,
        delay_seconds=delay,
        ttl_seconds=ttl,
        unique_key=key,
    )


def to_message(job: ClaimedJob) -> dict[str, Any]:
    """The Kombu message for a claimed row, stamped for this delivery."""
    payload = job.payload
    stored_headers = payload.get("headers") if isinstance(payload, dict) else None
    task = task_fields(stored_headers, _stored_body(payload))
    message = from_payload(payload, json_body=task is not None)
    headers = message["headers"]
    # The eta stays as sent (the task reads it); the database held the job until
    # run_at, and clock.py has the worker run it at once instead of waiting again.
    if job.expires_in is not None and headers.get("expires") and is_task(headers):
        # Celery's worker drops an expired task by its own clock: give it the
        # database's verdict, as a moment on that clock.
        local = datetime.now(UTC) + timedelta(seconds=job.expires_in)
        headers["expires"] = local.isoformat()
    properties = message["properties"]
    retries = (task.get("retries") or 0) if task else 0
    if not isinstance(retries, int) or isinstance(retries, bool):
        raise InvalidPayload("payload header 'retries' is not an integer")
    if properties.get("priority") is None:
        # Shown as Redis and RabbitMQ show it (Kombu stamps 0 when none is given),
        # though the row got its queue's default_priority. The mark lets a retry,
        # which re-sends this 0, keep the queue's default (finalize.py).
        properties.update({"priority": 0, delivery.DEFAULT_PRIORITY: True})
    properties.update(
        delivery_tag=_tag(job.id, job.attempt),
        delivery_info={
            "exchange": payload.get("exchange", ""),
            "routing_key": payload.get("routing_key") or job.queue_name,
            "priority": properties.get("priority"),
            "redelivered": job.attempt > int(retries) + 1,
        },
        pgqueue_task=task is not None,
    )
    properties.update({delivery.JOB: str(job.id), delivery.ATTEMPT: job.attempt})
    return message
