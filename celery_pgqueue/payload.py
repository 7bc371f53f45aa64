"""Kombu message <-> ``jobs.payload``: readable JSON, bounded size, clear refusals.

Virtual transports base64 the body. When the body is JSON (Celery's default
serializer) we store it decoded, so an operator can read a task's name, args and
kwargs with SQL (``payload->'headers'->>'task'``, ``payload->'body'->0``). Other
serializers keep their encoded text, and so does a JSON body holding values jsonb
would refuse or change (see :mod:`celery_pgqueue.storable`); such header entries go
to ``encoded``. Per-delivery fields (delivery tag, routing info) are not stored:
they are minted again at each claim. The size limit counts the task's own data;
Celery's canvas bookkeeping in the body has its own cap (``max_canvas_bytes``).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
from typing import Any

from kombu.serialization import dumps, loads, registry

from celery_pgqueue.errors import (
    CanvasTooLarge,
    InvalidPayload,
    PayloadNotSerializable,
    PayloadTooLarge,
)
from celery_pgqueue.storable import jsonb_keeps, strict_json, suspect

JSON_TYPES = ("application/json",)
_PER_DELIVERY = ("delivery_tag", "delivery_info", "body_encoding")
# How a stored body is encoded: ours ("json": stored decoded) and Kombu's virtual
# transports' (base64, or the text as is).
_BODY_ENCODINGS = (None, "json", "base64", "utf-8")


def to_payload(
    message: dict[str, Any], *, limit: int, canvas_limit: int | None = None
) -> tuple[dict[str, Any], int]:
    """The JSON document stored for ``message``, and its size in bytes.

    Raises PayloadTooLarge when the task's own data (args, kwargs, headers) is over
    ``limit`` (option ``max_payload_bytes``), CanvasTooLarge when Celery's canvas
    bookkeeping in it is over ``canvas_limit`` (``max_canvas_bytes``; None: no cap),
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
    document: dict[str, Any] = {
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
        try:
            text = _compact(document)
            exact = not suspect(text)
        except ValueError:  # a decoded body holding 1e400: inf, which JSON cannot write
            exact = False
        if not exact:
            if stored_encoding == "json" and not jsonb_keeps(body):
                document["body"], document["body_encoding"] = message.get("body"), body_encoding
            _encode_what_jsonb_changes(document)
            text = _compact(document)
    except (TypeError, ValueError) as exc:
        raise PayloadNotSerializable(
            f"message headers/properties are not JSON-serialisable ({exc}); "
            "pass ids and plain values (str, int, float, bool, list, dict)"
        ) from exc
    size = len(text.encode())
    if size > limit or (canvas_limit is not None and size > canvas_limit):
        _check_size(message, document, size, limit, canvas_limit)
    return document, size


def _check_size(
    message: dict[str, Any],
    document: dict[str, Any],
    size: int,
    limit: int,
    canvas_limit: int | None,
) -> None:
    """Refuse a message whose data, or whose canvas, is over its own limit.

    Only called when the whole message is over one of them, so the common small
    message pays nothing for the split.
    """
    canvas = _canvas_bytes(message, document)
    task = (message.get("headers") or {}).get("task")
    what = f"task {task!r}" if task else "message"
    data = size - canvas
    if data > limit:
        without = f" without its {canvas:,}-byte canvas" if canvas else ""
        raise PayloadTooLarge(
            f"{what} is {data:,} bytes{without}, over the {limit:,}-byte limit "
            "(option max_payload_bytes in broker_transport_options); the queue tier "
            "carries ids and small config: store large data elsewhere and pass its id"
        )
    if canvas_limit is not None and canvas > canvas_limit:
        raise CanvasTooLarge(
            f"{what} carries {canvas:,} bytes of canvas (the rest of its chain, chord "
            f"and callback signatures), over the {canvas_limit:,}-byte limit (option "
            "max_canvas_bytes in broker_transport_options); raise the option, or "
            "publish the big group from a task instead of inside one chain"
        )


def _canvas_bytes(message: dict[str, Any], document: dict[str, Any]) -> int:
    """Bytes of the stored document that are Celery's canvas bookkeeping.

    A Celery task message (protocol 2) has the body ``[args, kwargs, embed]``; the
    embed holds callbacks, errbacks, the rest of the chain and the chord. Any other
    message, or a body that does not decode, has none: all of it counts as data.
    """
    headers = message.get("headers") or {}
    if not (headers.get("task") and headers.get("id")):
        return 0
    body = document.get("body")
    if document.get("body_encoding") == "json":
        embed = _embed_of(body)
        return len(json.dumps(embed, separators=(",", ":")).encode()) if embed else 0
    content_type = str(document.get("content-type") or "")
    if body is None:
        return 0
    try:
        raw = base64.b64decode(body) if document.get("body_encoding") == "base64" else body
        value = loads(raw, content_type, document.get("content-encoding"), accept=[content_type])
        embed = _embed_of(value)
        if not embed:
            return 0
        _, _, encoded = dumps(embed, serializer=registry.type_to_name[content_type])
    except Exception:  # compressed, or a serializer we cannot run: count it all as data
        return 0
    size = len(encoded if isinstance(encoded, bytes) else str(encoded).encode())
    return size * 4 // 3 if document.get("body_encoding") == "base64" else size


def _embed_of(body: Any) -> dict[str, Any] | None:
    if isinstance(body, (list, tuple)) and len(body) == 3 and isinstance(body[2], dict):
        return body[2]
    return None


def _compact(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), allow_nan=False)


def _encode_what_jsonb_changes(document: dict[str, Any]) -> None:
    """Move header and property entries ``jsonb`` would refuse or change into ``encoded``.

    ``encoded`` maps "headers"/"properties" to base64 of the JSON text of those entries
    (Celery's ``argsrepr`` of an argument holding NUL, say); the rest stays readable,
    the task name included. :func:`from_payload` puts them back.
    """
    encoded: dict[str, str] = {}
    for section in ("headers", "properties"):
        entries = document[section]
        if jsonb_keeps(entries):
            continue
        odd = {k: v for k, v in entries.items() if not jsonb_keeps({k: v})}
        document[section] = {k: v for k, v in entries.items() if k not in odd}
        text = json.dumps(odd, allow_nan=False)
        encoded[section] = base64.b64encode(text.encode()).decode()
    if encoded:
        document["encoded"] = encoded


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
    headers = dict(document.get("headers") or {})
    properties = dict(document.get("properties") or {})
    for section, entries in _decoded_entries(document.get("encoded")).items():
        (headers if section == "headers" else properties).update(entries)
    properties["body_encoding"] = encoding
    return {
        "body": body,
        "content-type": content_type,
        "content-encoding": content_encoding,
        "headers": headers,
        "properties": properties,
    }


def _decoded_entries(encoded: Any) -> dict[str, dict[str, Any]]:
    """The header/property entries :func:`_encode_what_jsonb_changes` set aside."""
    if encoded is None:
        return {}
    decoded: dict[str, dict[str, Any]] = {}
    if isinstance(encoded, dict) and set(encoded) <= {"headers", "properties"}:
        for section, text in encoded.items():
            try:
                entries = json.loads(base64.b64decode(text, validate=True))
            except (TypeError, ValueError, binascii.Error):
                break
            if not isinstance(entries, dict):
                break
            decoded[section] = entries
        else:
            return decoded
    raise InvalidPayload("payload 'encoded' must map 'headers'/'properties' to base64 JSON objects")


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
        return (strict_json(raw),)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        return None
