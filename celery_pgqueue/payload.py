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
import codecs
import json
from typing import Any

from celery_pgqueue.errors import InvalidPayload, PayloadNotSerializable, PayloadTooLarge

JSON_TYPES = ("application/json",)
_PER_DELIVERY = ("delivery_tag", "delivery_info", "body_encoding")
# How a stored body is encoded: ours ("json": stored decoded) and Kombu's virtual
# transports' (base64, or the text as is).
_BODY_ENCODINGS = (None, "json", "base64", "utf-8")


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


def from_payload(document: Any, *, json_body: bool = False) -> dict[str, Any]:
    """Rebuild the Kombu message dict (without per-delivery fields) from a payload.

    Raises InvalidPayload, naming what is wrong (never the content), for a document
    this module could not have written: a row edited by hand must not reach Kombu,
    where a body that fails to decode stops the worker's event loop. ``json_body``
    (Celery tasks): a body whose content-type is JSON must also decode as JSON, as
    Celery acks and drops a task it cannot decode. Bodies stored as JSON always do.
    """
    if not isinstance(document, dict):
        raise InvalidPayload(f"the payload is a JSON {_json_kind(document)}, not an object")
    for key in ("headers", "properties"):
        if document.get(key) is not None and not isinstance(document[key], dict):
            raise InvalidPayload(
                f"payload {key!r} is a JSON {_json_kind(document[key])}, not an object"
            )
    content_type = document.get("content-type")
    if not isinstance(content_type, str) or not content_type:
        raise InvalidPayload("the payload has no 'content-type' (every Kombu message has one)")
    content_encoding = document.get("content-encoding")
    if content_encoding is not None and not _is_codec(content_encoding):
        raise InvalidPayload("payload 'content-encoding' is not a known text encoding")
    body = document.get("body")
    encoding = document.get("body_encoding")
    if encoding not in _BODY_ENCODINGS:
        raise InvalidPayload(
            f"payload 'body_encoding' must be one of {', '.join(map(str, _BODY_ENCODINGS))}"
        )
    if encoding == "json":
        text = json.dumps(body, separators=(",", ":"))
        body, encoding = base64.b64encode(text.encode()).decode(), "base64"
    elif body is not None and not isinstance(body, str):
        raise InvalidPayload(f"payload 'body' is a JSON {_json_kind(body)}, not encoded text")
    elif body is not None:
        raw = body.encode()
        if encoding == "base64":
            try:
                raw = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidPayload("payload 'body' is not valid base64") from None
        if json_body and content_type in JSON_TYPES and not _is_json(raw):
            raise InvalidPayload("payload 'body' is not JSON although its content-type says so")
    properties = dict(document.get("properties") or {})
    properties["body_encoding"] = encoding
    return {
        "body": body,
        "content-type": content_type,
        "content-encoding": content_encoding,
        "headers": dict(document.get("headers") or {}),
        "properties": properties,
    }


def _json_kind(value: Any) -> str:
    """The JSON type name of a decoded value (for messages that must not quote it)."""
    for kind, name in ((bool, "boolean"), (str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else "number"


def _is_codec(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    if name == "binary":  # Kombu's name for raw bytes
        return True
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


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
