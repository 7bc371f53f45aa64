"""Small test utilities shared by the suite (import as ``from helpers import ...``).

Tests observe asynchronous systems (workers, LISTEN/NOTIFY, restarts), so they
poll for a condition with a deadline instead of sleeping and hoping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import celery
from psycopg.conninfo import conninfo_to_dict

T = TypeVar("T")

CELERY_5_7 = tuple(celery.VERSION[:2]) >= (5, 7)
"""Celery 5.7+: behaviour of Celery itself that older releases lack on every backend.

Tests guard only assertions about such behaviour with it (README "Supported versions").
"""


def wait_until(
    check: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    *,
    ignore: tuple[type[BaseException], ...] = (),
    message: str | None = None,
) -> T:
    """Call ``check`` until it returns something truthy, and return that value.

    Exceptions propagate at once unless listed in ``ignore`` (e.g.
    ``psycopg.OperationalError`` while a server restarts).  On timeout an
    AssertionError names the check, the last value and the last ignored error,
    so a failure says *what* never happened.
    """
    deadline = time.monotonic() + timeout
    last_value: object = None
    last_error: BaseException | None = None
    attempts = 0
    while True:
        attempts += 1
        try:
            value = check()
        except ignore as exc:
            last_error = exc
        else:
            if value:
                return value
            last_value = value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    name = message or getattr(check, "__qualname__", repr(check))
    detail = f"last value {last_value!r}"
    if last_error is not None:
        detail += f", last error {type(last_error).__name__}: {last_error}"
    raise AssertionError(
        f"timed out after {timeout}s ({attempts} tries) waiting for {name}: {detail}"
    )


def with_database(url: str, database: str) -> str:
    """The same server/credentials/options as ``url`` but connected to ``database``.

    Accepts a ``postgresql://`` URL or a libpq ``key=value`` string and always
    returns a URL, which both psycopg and SQLAlchemy-style parsers accept.
    """
    if "://" in url:
        parts = urlsplit(url)
        return urlunsplit(parts._replace(path="/" + quote(database, safe="")))
    params = {k: v for k, v in conninfo_to_dict(url).items() if v is not None}
    params.pop("dbname", None)
    query = urlencode({k: str(v) for k, v in params.items()})
    return f"postgresql:///{quote(database, safe='')}" + (f"?{query}" if query else "")
