"""Why PostgreSQL refused a connection: the SQLSTATE it sent, not the words.

A refused login, a missing database or a ``pg_hba.conf`` rule arrive as an
ErrorResponse with a SQLSTATE, but libpq keeps that code to itself when connecting:
psycopg's ``OperationalError`` has ``sqlstate`` None and only the (translatable)
text. libpq does print the code when the connection's error verbosity is
``PQERRORS_SQLSTATE``, which psycopg does not expose; so after a failed connect
without a code, :func:`refusal_code` connects once more through libpq itself with
that verbosity and reads the code. Only failure paths pay for it.

:func:`refuses_ssl` covers the one permanent refusal without a SQLSTATE: the URL
requires SSL (``sslmode=require`` and stricter) and the server does not offer it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import os
import re
import selectors
import socket
import struct
import time
from typing import Any

import psycopg

from celery_pgqueue.errors import (
    AuthenticationFailed,
    ConnectionRejected,
    DatabaseNotFound,
    DatabaseUnavailable,
    PgQueueError,
    first_line,
)
from celery_pgqueue.options import DatabaseURL

# libpq's enums (libpq-fe.h): stable since PostgreSQL 7.4/12.
_CONNECTION_BAD = 1
_POLLING_FAILED, _POLLING_READING, _POLLING_WRITING, _POLLING_OK = 0, 1, 2, 3
_PQERRORS_SQLSTATE = 3
# "FATAL:  3D000" - a severity, two spaces, five characters of [0-9A-Z].
_CODE_LINE = re.compile(r":\s+([0-9A-Z]{5})\s*$", re.MULTILINE)
# The protocol's SSLRequest: length 8, code 1234.5679.
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
REQUIRES_SSL = frozenset({"require", "verify-ca", "verify-full"})


@functools.cache
def _libpq() -> Any | None:
    """The libpq psycopg runs on (its wheel's own copy first), or None."""
    candidates: list[str] = []
    with contextlib.suppress(ImportError):
        import psycopg_binary

        root = os.path.dirname(psycopg_binary.__file__)
        for pattern in ("../psycopg_binary.libs/libpq*", ".dylibs/libpq*"):
            candidates += sorted(glob.glob(os.path.join(root, pattern)))
    found = ctypes.util.find_library("pq")
    if found:
        candidates.append(found)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.PQconnectStart.restype = ctypes.c_void_p
        lib.PQconnectStart.argtypes = [ctypes.c_char_p]
        for name in ("PQstatus", "PQconnectPoll", "PQsocket"):
            getattr(lib, name).restype = ctypes.c_int
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.PQsetErrorVerbosity.restype = ctypes.c_int
        lib.PQsetErrorVerbosity.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.PQerrorMessage.restype = ctypes.c_char_p
        lib.PQerrorMessage.argtypes = [ctypes.c_void_p]
        lib.PQfinish.restype = None
        lib.PQfinish.argtypes = [ctypes.c_void_p]
        return lib
    return None


def refusal_code(conninfo: str, timeout: float) -> str | None:
    """Connect once with libpq's SQLSTATE verbosity: the code the server refused with.

    None when the connection succeeds, when the server cannot be reached within
    ``timeout`` seconds, when the error is libpq's own (refused, DNS, SSL) or when no
    libpq can be loaded.
    """
    lib = _libpq()
    if lib is None:
        return None
    conn = lib.PQconnectStart(conninfo.encode())
    if not conn:
        return None
    try:
        lib.PQsetErrorVerbosity(conn, _PQERRORS_SQLSTATE)
        deadline = time.monotonic() + timeout
        state = _POLLING_WRITING
        while lib.PQstatus(conn) != _CONNECTION_BAD and state != _POLLING_FAILED:
            if state == _POLLING_OK:
                return None
            left = deadline - time.monotonic()
            fd = lib.PQsocket(conn)
            if left <= 0 or fd < 0:
                return None
            # selectors, not select(): a busy worker's descriptors may pass FD_SETSIZE.
            event = selectors.EVENT_READ if state == _POLLING_READING else selectors.EVENT_WRITE
            with selectors.DefaultSelector() as selector:
                selector.register(fd, event)
                selector.select(left)
            state = lib.PQconnectPoll(conn)
        message = (lib.PQerrorMessage(conn) or b"").decode("utf-8", "replace")
    finally:
        lib.PQfinish(conn)
    codes = _CODE_LINE.findall(message)
    return codes[-1] if codes else None


def refuses_ssl(host: str, port: int, timeout: float) -> bool:
    """Whether the server at ``host:port`` answers an SSLRequest with "no SSL here"."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_SSL_REQUEST)
            return sock.recv(1) == b"N"
    except OSError:
        return False


# SQLSTATE classes worth waiting out: the connection broke (08), the server is short
# of connections or memory (53), an operator stopped it or it is starting, in recovery
# or shutting down (57), an I/O error (58). Any other code a server sends while
# connecting will come back on every attempt.
TRANSIENT_CLASSES = ("08", "53", "57", "58")


def connection_failure(
    exc: BaseException, url: DatabaseURL, connect_timeout: float = 10.0
) -> PgQueueError:
    """The error for a failed connection: permanent (named) or DatabaseUnavailable.

    Decided by the SQLSTATE the server sent, which libpq hides while connecting
    (see :mod:`celery_pgqueue.store.refusal`), never by the message's words.
    """
    reason = first_line(exc)
    if getattr(exc, "sqlstate", None) is not None:
        # The server answered a statement (libpq never has a code while connecting):
        # a session ended by an administrator, a shutdown, a full server.
        return DatabaseUnavailable(f"PostgreSQL at {url.masked()} is unavailable: {reason}")
    code: str | None = None
    pgconn = getattr(exc, "pgconn", None)
    if getattr(pgconn, "needs_password", False):
        return AuthenticationFailed(
            f"PostgreSQL at {url.masked()} asks for a password and the URL has none "
            f"({reason}); fix the user name or password in the URL (broker_url / "
            "result_backend), or the server's pg_hba.conf"
        )
    if isinstance(exc, psycopg.OperationalError):
        if isinstance(exc, psycopg.errors.ConnectionTimeout):
            return DatabaseUnavailable(f"PostgreSQL at {url.masked()} is unavailable: {reason}")
        timeout = max(1.0, connect_timeout)
        code = refusal_code(url.libpq_url(), timeout)
        if (
            code is None
            and _requires_ssl(url)
            and refuses_ssl(url.host or "localhost", url.port or 5432, timeout)
        ):
            return ConnectionRejected(
                f"PostgreSQL at {url.masked()} does not accept SSL, and the URL requires it "
                f"(sslmode={dict(url.query)['sslmode']}): {reason}; enable SSL on the server "
                "or lower sslmode in the URL"
            )
    if code is None or code.startswith(TRANSIENT_CLASSES):
        return DatabaseUnavailable(f"PostgreSQL at {url.masked()} is unavailable: {reason}")
    if code.startswith("28"):
        return AuthenticationFailed(
            f"PostgreSQL at {url.masked()} refused the login ({reason}; SQLSTATE {code}); "
            "fix the user name or password in the URL (broker_url / result_backend), or "
            "the server's pg_hba.conf (it decides which users, databases, hosts and SSL "
            "modes may log in)",
            code,
        )
    if code == "3D000":
        return DatabaseNotFound(
            f"PostgreSQL at {url.masked()} has no database {url.database!r} ({reason}); "
            f"create the database (createdb {url.database or '<name>'}, then run the "
            "migrate command) or fix its name in the URL",
            code,
        )
    return ConnectionRejected(
        f"PostgreSQL at {url.masked()} refused the connection ({reason}; SQLSTATE "
        f"{code}); retrying cannot help: fix the URL (broker_url / result_backend) or "
        "the server's settings",
        code,
    )


def _requires_ssl(url: DatabaseURL) -> bool:
    return dict(url.query).get("sslmode") in REQUIRES_SSL
