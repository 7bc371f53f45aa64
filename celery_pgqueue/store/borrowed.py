"""Run the store's statements on a caller's own psycopg connection.

``enqueue_in(psycopg_connection)`` (or Django's connection, which wraps one) must
insert jobs inside the caller's transaction. The store speaks SQLAlchemy Core, so the
caller's DBAPI connection is lent to a small engine of its own: every statement runs
on it, but commit, rollback and close stay the caller's (SQLAlchemy's would end their
transaction). The engine's dialect is initialised once, on a connection of ours, so
those first-connect queries and their rollback never touch a caller's transaction.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy as sa

if TYPE_CHECKING:
    from celery_pgqueue.options import DatabaseURL


class _Lent:
    """The caller's connection as SQLAlchemy sees it: ending it is a no-op."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def commit(self) -> None:  # the caller commits
        pass

    def rollback(self) -> None:  # the caller rolls back
        pass

    def close(self) -> None:  # the caller closes
        pass

    def add_notice_handler(self, handler: Any) -> None:  # not one per lending
        pass


class Lender:
    """Wraps callers' psycopg connections as SQLAlchemy Connections for one store."""

    def __init__(
        self, url: DatabaseURL, connect_args: dict[str, Any], execution_options: dict[str, Any]
    ) -> None:
        self._lending = threading.local()

        def creator() -> Any:
            raw = getattr(self._lending, "raw", None)
            if raw is not None:
                return _Lent(raw)
            return psycopg.connect(url.libpq_url(), **connect_args)

        self.engine = sa.create_engine(
            url.sqlalchemy_url(),
            creator=creator,
            poolclass=sa.pool.NullPool,
            pool_reset_on_return=None,
            execution_options=execution_options,
        )
        with self.engine.connect():  # dialect set-up on our own connection
            pass

    def lend(self, raw: psycopg.Connection[Any]) -> sa.Connection:
        """A Connection running on ``raw``; closing it leaves ``raw`` as it was."""
        self._lending.raw = raw
        try:
            return self.engine.connect()
        finally:
            self._lending.raw = None
