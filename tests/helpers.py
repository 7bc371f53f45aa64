"""Small test utilities shared by the suite (import as ``from helpers import ...``).

Tests observe asynchronous systems (workers, LISTEN/NOTIFY, restarts), so they
poll for a condition with a deadline instead of sleeping and hoping.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import celery
from celery.contrib.testing.worker import start_worker
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


def settle_worker_threads(before: Collection[threading.Thread], grace: float = 60.0) -> list[str]:
    """Wait for in-process worker threads started since ``before`` to end; reset Celery's
    stop flag; return the stacks of any still running after ``grace`` seconds.

    ``celery.contrib.testing.worker.start_worker`` stops its thread by setting the
    process-global ``celery.worker.state.should_terminate`` to 0 and resets it only if
    the thread ends within ``shutdown_timeout``. Otherwise the flag stays 0: every later
    in-process worker of the run exits at once, and its ``start_worker`` waits forever
    for a consumer that never starts.
    """
    from celery.worker import state

    leftovers = [
        thread
        for thread in threading.enumerate()
        if thread not in before and thread.daemon and thread.name.endswith("(start)")
    ]
    deadline = time.monotonic() + grace
    for thread in leftovers:
        thread.join(max(0.0, deadline - time.monotonic()))
    state.should_terminate = None
    frames = sys._current_frames()
    return [
        f"{thread.name}:\n" + "".join(traceback.format_stack(frames[thread.ident]))
        for thread in leftovers
        if thread.is_alive() and thread.ident in frames
    ]


@contextlib.contextmanager
def running_worker(app: celery.Celery, **kwargs: Any) -> Iterator[Any]:
    """A real Celery worker in a thread: solo pool, no ping task, WARNING logs.

    It gets 20 s to stop, not ``start_worker``'s 10: an idle worker's event loop looks
    at the stop flag only between polls, and Kombu's hub polls for up to 10 s when
    no timer is due sooner, so 10 s was sometimes just too short.
    """
    kwargs.setdefault("pool", "solo")
    kwargs.setdefault("perform_ping_check", False)
    kwargs.setdefault("shutdown_timeout", 20.0)
    kwargs.setdefault("loglevel", "WARNING")
    with start_worker(app, **kwargs) as worker:
        yield worker
