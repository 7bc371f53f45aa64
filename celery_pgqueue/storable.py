"""What PostgreSQL keeps exactly: the rare JSON values ``jsonb`` and ``text`` change.

``jsonb`` refuses NUL (``\\u0000``) and unpaired surrogates, and keeps numbers as
``numeric``: a float written in exponent form (``1e+20``) reads back as an integer and
``-0.0`` loses its sign. ``text`` refuses NUL and anything that is not UTF-8. All of
it is valid JSON that Redis keeps as sent, so the few rows holding such values keep
those parts encoded (base64 of the JSON text) and stay readable everywhere else.
"""

from __future__ import annotations

import math
import re
from typing import Any

_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")
# In JSON text: what may decode to one of the values above (a NUL or surrogate, raw
# or escaped; an exponent; a negative zero; a huge number). A hit only means "look
# closer" (a hex id matches it too), so it never decides alone.
_SUSPECT_JSON = re.compile(r"\\u0000|\\u[dD][89a-fA-F]|[0-9][eE]|-0(?![0-9])|[\x00\ud800-\udfff]")


def jsonb_keeps(value: Any) -> bool:
    """True when ``value`` stored as ``jsonb`` reads back equal, with the same types."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _BAD_TEXT.search(item):
                return False
        elif isinstance(item, float):
            if not _number_keeps(item):
                return False
        elif isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(key, str) and _BAD_TEXT.search(key):
                    return False
                pending.append(inner)
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return True


def jsonb_keeps_text(text: str, value: Any) -> bool:
    """:func:`jsonb_keeps` for ``value`` decoded from ``text``; most texts need no walk."""
    return _SUSPECT_JSON.search(text) is None or jsonb_keeps(value)


def printable(text: str) -> str:
    """``text`` as a ``text`` column holds it: NUL and lone surrogates as backslash escapes."""
    if _BAD_TEXT.search(text) is None:
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _number_keeps(number: float) -> bool:
    # numeric prints what it was given without the exponent: 1e+20 becomes an integer.
    if not math.isfinite(number) or "e+" in repr(number):
        return False
    return not (number == 0 and math.copysign(1.0, number) < 0)
