"""Enqueue inside the caller's own database transaction.

Within ``with enqueue_in(connection):`` every task published to a pgqueue broker on
the same database inserts its ``jobs`` row on ``connection``: the task commits or
rolls back with the caller's data, and workers are woken by NOTIFY at commit.

``connection`` may be a SQLAlchemy ``Connection`` or ``Session``, a psycopg 3
connection, or Django's ``django.db.connection`` inside ``transaction.atomic()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.pq import TransactionStatus

from celery_pgqueue.errors import TransactionError

ENDED = (
    "enqueue_in(): the caller's transaction has already ended; publish inside an open "
    "transaction or outside enqueue_in()"
)


class _Caller:
    """The connection given to ``enqueue_in`` and what it was lent as, per store."""

    def __init__(self, connection: Any) -> None:
        self.sqlalchemy: sa.Connection | None = None
        self.django: Any = None
        self.psycopg: psycopg.Connection[Any] | None = None
        if isinstance(connection, sa.Connection):
            self.sqlalchemy = connection
        elif isinstance(connection, psycopg.Connection):
            self.psycopg = connection
        elif _is_django(connection):
            self.django = connection
        elif _is_session(connection):
            self.sqlalchemy = connection.connection()
        else:
            raise TransactionError(
                "enqueue_in() takes a SQLAlchemy Connection or Session, a psycopg 3 "
                f"connection or django.db.connection, got {type(connection).__name__}"
            )
        self.lent: dict[int, sa.Connection] = {}
        self.checked: set[int] = set()

    def connection(self, store: Any) -> sa.Connection:
        """A Connection on the caller's transaction, for ``store``; refuses an ended one."""
        if self.sqlalchemy is not None:
            if self.sqlalchemy.closed or not self.sqlalchemy.in_transaction():
                raise TransactionError(ENDED)
            return self.sqlalchemy
        raw = self._django_raw() if self.django is not None else self.psycopg
        assert raw is not None
        _check_open(raw)
        conn = self.lent.get(id(store))
        if conn is None:
            conn = self.lent[id(store)] = store.lend(raw)
        return conn

    def _django_raw(self) -> psycopg.Connection[Any]:
        django = self.django
        if django.vendor != "postgresql":
            raise TransactionError(
                f"enqueue_in(): Django's connection is to {django.vendor}, not PostgreSQL"
            )
        if not django.in_atomic_block:
            raise TransactionError(
                "enqueue_in(django.db.connection): no transaction is open; publish inside "
                "`with transaction.atomic():` (Django's autocommit would commit the job alone)"
            )
        if django.needs_rollback:
            raise TransactionError(
                "enqueue_in(): the Django transaction is marked for rollback after an error"
            )
        django.ensure_connection()
        raw = django.connection
        if not isinstance(raw, psycopg.Connection):
            raise TransactionError(
                "enqueue_in(django.db.connection) needs Django's psycopg 3 backend; "
                f"this one is {type(raw).__module__}.{type(raw).__name__}"
            )
        return raw

    def close(self) -> None:
        for conn in self.lent.values():
            conn.close()  # leaves the caller's connection and transaction as they were
        self.lent.clear()


_current: ContextVar[_Caller | None] = ContextVar("celery_pgqueue_tx", default=None)


@contextlib.contextmanager
def enqueue_in(connection: Any) -> Iterator[Any]:
    """Publish tasks through ``connection``'s transaction (see the module docstring)."""
    caller = _Caller(connection)
    token = _current.set(caller)
    try:
        yield connection
    finally:
        _current.reset(token)
        caller.close()


def connection_for(store: Any) -> sa.Connection | None:
    """The caller's connection for ``store``'s database, if inside ``enqueue_in``.

    Raises TransactionError when the transaction has ended or the connection is to
    another database than the broker's: a task must never be published half-way.
    """
    caller = _current.get()
    if caller is None:
        return None
    conn = caller.connection(store)
    if id(store) not in caller.checked:
        theirs, ours = store.identity(conn), store.identity()
        if theirs != ours:
            raise TransactionError(
                f"enqueue_in(): the connection is to database {theirs[0]!r}, but the broker "
                f"uses {store.url.masked()}; enqueue in the broker's database, or publish "
                "outside enqueue_in()"
            )
        caller.checked.add(id(store))
    return conn


def _check_open(raw: psycopg.Connection[Any]) -> None:
    """psycopg: a transaction is open, or begins with our statement and stays the caller's."""
    if raw.closed:
        raise TransactionError(ENDED)
    status = raw.info.transaction_status
    if status == TransactionStatus.INERROR:
        raise TransactionError(
            "enqueue_in(): the caller's transaction failed; roll it back before publishing"
        )
    if status == TransactionStatus.IDLE and raw.autocommit:
        raise TransactionError(
            "enqueue_in(): the psycopg connection is in autocommit mode with no transaction "
            "open; publish inside `with conn.transaction():`"
        )


def _is_django(connection: Any) -> bool:
    return all(
        hasattr(connection, name) for name in ("vendor", "in_atomic_block", "ensure_connection")
    )


def _is_session(connection: Any) -> bool:
    return callable(getattr(connection, "connection", None)) and hasattr(connection, "get_bind")
