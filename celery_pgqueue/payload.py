"""Kombu message <-> ``jobs.payload``: readable JSON, bounded size, clear refusals.

Virtual transports base64 the body. When the body is JSON (Celery's default
serializer) we store it decoded, so an operator can read a task's name, args and
kwargs with SQL (``payload->'headers'->>'task'``, ``payload->'body'->0``). Other
serializers keep their encoded text. Per-delivery fields (delivery tag, routing
info) are not stored: they are minted again at each claim.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from celery_pgqueue.errors import PayloadNotSerializable, PayloadTooLarge

JSON_TYPES = ("application/json",)
_PER_DELIVERY = ("delivery_tag", "delivery_info", "body_encoding")


def to_payload(message: dict[str, Any], *, limit: int) -> tuple[dict[str, Any], int]:
    """The JSON document stored for ``message``, and its size in bytes.

    Raises PayloadTooLarge over ``limit`` (the caller's option ``max_payload_bytes``)
    and PayloadNotSerializable when headers or properties are not JSON.
    """
    properties = dict(message.get("properties") or {})
    body_encoding = properties.get("body_encoding")
    delivery_info = properties.get("delivery_info") or {}
    body: Any = message.get("body")
    stored_encoding = body_encoding
    if message.get("content-type") in JSON_TYPES:
        decoded = _json_body(body, body_encoding)
        if decoded is not None:
            body, stored_encoding = decoded[0], "json"
    for key in _PER_DELIVERY:
        properties.pop(key, None)
    document = {
        "body": body,
        "body_encoding": stored_encoding,
        "content-type": message.get("content-type"),
        "content-encoding": message.get("content-encoding"),
        "headers": message.get("headers") or {},
        "properties": properties,
        "exchange": delivery_info.get("exchange") or "",
        "routing_key": delivery_info.get("routing_key") or "",
    }
    try:
        text = json.dumps(document, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PayloadNotSerializable(
            f"message headers/properties are not JSON-serialisable ({exc}); "
            "pass ids and plain values (str, int, float, bool, list, dict)"
        ) from exc
    size = len(text.encode())
    if size > limit:
        task = (message.get("headers") or {}).get("task")
        what = f"task {task!r}" if task else "message"
        raise PayloadTooLarge(
            f"{what} is {size:,} bytes, over the {limit:,}-byte limit "
            "(option max_payload_bytes in broker_transport_options); the queue tier "
            "carries ids and small config: store large data elsewhere and pass its id"
        )
    return document, size


def from_payload(document: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the Kombu message dict (without per-delivery fields) from a payload."""
    body = document.get("body")
    encoding = document.get("body_encoding")
    if encoding == "json":
        text = json.dumps(body, separators=(",", ":"))
        body, encoding = base64.b64encode(text.encode()).decode(), "base64"
    properties = dict(document.get("properties") or {})
    properties["body_encoding"] = encoding
    return {
        "body": body,
        "content-type": document.get("content-type"),
        "content-encoding": document.get("content-encoding"),
        "headers": dict(document.get("headers") or {}),
        "properties": properties,
    }


def _json_body(body: Any, body_encoding: str | None) -> tuple[Any] | None:
    """The body as a JSON value, or None when it is not valid strict JSON."""
    try:
        if body_encoding == "base64":
            raw = base64.b64decode(body, validate=True)
        elif isinstance(body, bytes):
            raw = body
        elif isinstance(body, str):
            raw = body.encode()
        else:
            return None
        value = json.loads(raw, parse_constant=_reject_constant)
        # PostgreSQL jsonb cannot hold \u0000; keep such bodies encoded.
        if "\\u0000" in raw.decode("utf-8"):
            return None
        return (value,)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
