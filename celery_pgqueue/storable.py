"""What PostgreSQL keeps exactly: the rare JSON values ``jsonb`` and ``text`` change.

``jsonb`` refuses NUL (``\\u0000``) and unpaired surrogates, and keeps numbers as
``numeric``: a float written in exponent form (``1e+20``) reads back as an integer and
``-0.0`` loses its sign. ``text`` refuses NUL and anything that is not UTF-8. All of
it is valid JSON that Redis keeps as sent, so the few rows holding such values keep
those parts encoded (base64 of the JSON text) and stay readable everywhere else.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")
# What json.dumps writes (ASCII, lower-case escapes, floats by repr) for such values:
# NUL and surrogates as escapes, 1e+16 and up with "e+", and "-0.0" (NaN and Infinity
# are refused before). A mark only means "look closer" (an emoji is a surrogate pair,
# a string may hold "e+"); four substring scans keep the common message cheap.
_SUSPECT_MARKS = ("\\u0000", "\\ud", "e+", "-0.0")


def strict_json(text: str | bytes) -> Any:
    """``text`` parsed, refusing NaN and Infinity: not JSON, whatever Python writes."""
    return json.loads(text, parse_constant=_reject_constant)


def jsonb_keeps(value: Any) -> bool:
    """True when ``value`` stored as ``jsonb`` reads back equal, with the same types."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not _text_keeps(item):
                return False
        elif isinstance(item, float):
            if not _number_keeps(item):
                return False
        elif isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(key, str) and not _text_keeps(key):
                    return False
                pending.append(inner)
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return True


def jsonb_keeps_text(text: str, value: Any) -> bool:
    """:func:`jsonb_keeps` for ``value`` that ``json.dumps`` wrote as ``text``.

    Most texts need no walk. ``text`` must be Python's JSON (Kombu's is): what another
    writer sends (``1e20``, ``1E+20``) is only caught once Python wrote it again.
    """
    return not suspect(text) or jsonb_keeps(value)


def suspect(text: str) -> bool:
    """Whether Python-written JSON ``text`` may hold a value :func:`jsonb_keeps` refuses."""
    nul, surrogate, exponent, negative_zero = _SUSPECT_MARKS
    return (
        nul in text
        or surrogate in text
        or exponent in text
        or negative_zero in text
        or not text.isascii()
    )


def printable(text: str) -> str:
    """``text`` as a ``text`` column holds it: NUL and lone surrogates as backslash escapes."""
    if _BAD_TEXT.search(text) is None:
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _text_keeps(text: str) -> bool:
    if text.isascii():  # the common case, without the regular expression
        return "\x00" not in text
    return _BAD_TEXT.search(text) is None


def _number_keeps(number: float) -> bool:
    # numeric prints what it was given without the exponent: 1e+20 becomes an integer.
    if not math.isfinite(number) or "e+" in repr(number):
        return False
    return not (number == 0 and math.copysign(1.0, number) < 0)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
