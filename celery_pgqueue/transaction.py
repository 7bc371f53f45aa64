"""Enqueue inside the caller's own database transaction.

Within ``with enqueue_in(connection):`` every task published to a pgqueue broker on
the same database inserts its ``jobs`` row on ``connection``: the task commits or
rolls back with the caller's data, and workers are woken by NOTIFY at commit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import sqlalchemy as sa

from celery_pgqueue.errors import TransactionError

_current: ContextVar[sa.Connection | None] = ContextVar("celery_pgqueue_tx", default=None)


@contextlib.contextmanager
def enqueue_in(connection: Any) -> Iterator[sa.Connection]:
    """Publish tasks through ``connection`` (SQLAlchemy Connection or Session)."""
    conn = _as_connection(connection)
    token = _current.set(conn)
    try:
        yield conn
    finally:
        _current.reset(token)


def connection_for(store: Any) -> sa.Connection | None:
    """The caller's connection for ``store``'s database, if inside ``enqueue_in``.

    Raises TransactionError when the transaction has ended or the connection is to
    another database than the broker's: a task must never be published half-way.
    """
    conn = _current.get()
    if conn is None:
        return None
    if conn.closed or not conn.in_transaction():
        raise TransactionError(
            "enqueue_in(): the caller's transaction has already ended; publish inside "
            "an open transaction or outside enqueue_in()"
        )
    key = id(store)
    checked = conn.info.setdefault("celery_pgqueue_checked", set())
    if key not in checked:
        theirs, ours = store.identity(conn), store.identity()
        if theirs != ours:
            raise TransactionError(
                f"enqueue_in(): the connection is to database {theirs[0]!r}, but the broker "
                f"uses {store.url.masked()}; enqueue in the broker's database, or publish "
                "outside enqueue_in()"
            )
        checked.add(key)
    return conn


def _as_connection(connection: Any) -> sa.Connection:
    if isinstance(connection, sa.Connection):
        return connection
    session_connection = getattr(connection, "connection", None)
    if callable(session_connection) and hasattr(connection, "get_bind"):
        conn = session_connection()
        if isinstance(conn, sa.Connection):
            return conn
    raise TransactionError(
        f"enqueue_in() takes a SQLAlchemy Connection or Session, got {type(connection).__name__}"
    )
