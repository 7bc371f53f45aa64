"""Encoding states: Celery's meta as the JSON document ``jobs.result`` keeps, and back."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from celery import states
from celery.backends.base import Backend
from kombu.exceptions import EncodeError
from kombu.serialization import dumps, loads
from kombu.utils import json as kombu_json

from celery_pgqueue.errors import PayloadNotSerializable, PayloadTooLarge, first_line
from celery_pgqueue.storable import jsonb_keeps_text, strict_json

JSON = "application/json"


class ResultTooLarge(PayloadTooLarge, EncodeError):  # type: ignore[misc]
    """A result over ``max_payload_bytes``: the task is stored as failed with this error."""


class ResultNotSerializable(PayloadNotSerializable, EncodeError):  # type: ignore[misc]
    """A result the ``result_serializer`` cannot encode: stored as this task's failure."""


class ResultEncoding(Backend):  # type: ignore[misc]
    """The document codec of :class:`~celery_pgqueue.backend.PgQueueBackend`."""

    def _encode_document(
        self, document: dict[str, Any], task_id: str, state: str, request: Any
    ) -> Any:
        """``jobs.result``: strict JSON (what ``jsonb`` accepts), within ``max_payload_bytes``.

        A value that can't be stored raises an EncodeError Celery's tracer turns into
        the task's FAILURE. The failure itself must always fit: its message is cut and
        stored args dropped rather than raise while recording it.
        """
        limit = self.options.max_payload_bytes
        try:
            text, value = self._stored_json(document)
        except (EncodeError, TypeError, ValueError) as exc:
            if state not in states.EXCEPTION_STATES:
                name = getattr(request, "task", None) or "task"
                raise ResultNotSerializable(
                    f"the result of {name}[{task_id}] cannot be stored with "
                    f"result_serializer={self.serializer!r}: {first_line(exc)}; "
                    "return plain values (str, int, float, bool, None, list, dict)"
                ) from exc
            text, value = self._stored_json(_shrunk_failure(document, limit))
        size = len(text.encode())
        canvas_limit = self.options.max_canvas_bytes
        if size <= min(limit, canvas_limit):
            return value
        # The children (a chain's next group, say) are Celery's canvas bookkeeping: they
        # count under max_canvas_bytes, as they do in the message that started them.
        canvas = 0
        if document.get("children"):
            bare = {k: v for k, v in document.items() if k != "children"}
            canvas = size - len(self._stored_json(bare)[0].encode())
        if size - canvas <= limit and canvas <= canvas_limit:
            return value
        if state in states.EXCEPTION_STATES:
            return self._stored_json(_shrunk_failure(document, limit))[1]
        name = getattr(request, "task", None) or "task"
        if size - canvas > limit:
            raise ResultTooLarge(
                f"the result of {name}[{task_id}] is {size - canvas:,} bytes encoded, over "
                f"the {limit:,}-byte limit (max_payload_bytes in "
                "result_backend_transport_options); the queue tier keeps ids and small "
                "values: store large data elsewhere and return its id"
            )
        raise ResultTooLarge(
            f"the children of {name}[{task_id}] are {canvas:,} bytes encoded, over the "
            f"{canvas_limit:,}-byte limit (max_canvas_bytes in "
            "result_backend_transport_options); raise the option or start fewer tasks "
            "from one task"
        )

    def _stored_json(self, document: dict[str, Any]) -> tuple[str, Any]:
        """``document`` as JSON text and value, exactly as ``jsonb`` will keep it.

        Valid JSON that jsonb refuses or changes (NUL, lone surrogates, ``1e+20``,
        ``-0.0``) is rare: only then are result, args and kwargs enveloped (base64 of
        their JSON text, as for other serializers), and only in that row.
        """
        text = self._serialize(document)
        value = strict_json(text)
        if jsonb_keeps_text(text, value):
            return text, value
        text = self._serialize(document, envelope=True)
        value = strict_json(text)
        if not jsonb_keeps_text(text, value):
            raise ValueError(
                "it holds text PostgreSQL cannot store (NUL, an unpaired surrogate) "
                "outside the result, args and kwargs"
            )
        return text, value

    def _serialize(self, document: dict[str, Any], envelope: bool = False) -> str:
        """The document as JSON text: inline values (json), else enveloped ones."""
        if self._inline_json and not envelope:
            _, _, text = dumps(document, serializer=self.serializer)
            return text.decode() if isinstance(text, bytes) else str(text)
        document = dict(document)
        wrapped = [k for k in ("result", "args", "kwargs") if document.get(k) is not None]
        for key in wrapped:
            document[key] = self._envelope(document[key])
        document["encoded"] = wrapped
        return str(kombu_json.dumps(document))

    def _envelope(self, value: Any) -> dict[str, Any]:
        content_type, encoding, data = dumps(value, serializer=self.serializer)
        raw = data if isinstance(data, bytes) else str(data).encode(encoding or "utf-8")
        return {
            "content_type": content_type,
            "encoding": encoding,
            "data": base64.b64encode(raw).decode("ascii"),
        }

    def _decode_document(self, text: str) -> dict[str, Any]:
        document: dict[str, Any] = kombu_json.loads(text)
        for key in document.pop("encoded", None) or ():
            envelope = document.get(key)
            if isinstance(envelope, Mapping):
                raw = base64.b64decode(envelope["data"])
                document[key] = loads(
                    raw, envelope["content_type"], envelope["encoding"], accept=self.accept
                )
        return document


def error_summary(value: Any) -> str | None:
    """``Type: message`` of a stored exception (json dict or pickled instance)."""
    if isinstance(value, BaseException):
        name, text = type(value).__name__, str(value)
    elif isinstance(value, Mapping) and "exc_type" in value:
        name = str(value["exc_type"])
        message = value.get("exc_message")
        if isinstance(message, (list, tuple)):
            text = (
                "" if not message else str(message[0]) if len(message) == 1 else str(tuple(message))
            )
        else:
            text = "" if message is None else str(message)
    else:
        return None
    return f"{name}: {text}" if text else name


def _shrunk_failure(document: dict[str, Any], limit: int) -> dict[str, Any]:
    """A failure document that always encodes and fits: message cut, stored args dropped."""
    shrunk = {k: v for k, v in document.items() if k not in ("args", "kwargs")}
    value = document.get("result")
    summary = error_summary(value) or "Error"
    name, _, message = summary.partition(": ")
    module = value.get("exc_module") if isinstance(value, Mapping) else type(value).__module__
    room = max(64, limit // 4)
    shrunk["result"] = {
        "exc_type": name,
        "exc_module": module,
        "exc_message": [message[:room]],
    }
    shrunk.pop("children", None)
    return shrunk
