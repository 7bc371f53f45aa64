"""Running the per-task statements (:mod:`~celery_pgqueue.store.queries`) with psycopg.

Executing a statement through SQLAlchemy costs about 0.2 ms of CPU on top of psycopg
(checkout events, the autocommit switch and its reset, parameter processing, result
wrapping): as much as the round trip itself, paid three times per task (publish,
claim, finish). So these statements, plain SQL already, are sent by psycopg on a
connection borrowed from the store's SQLAlchemy pool (``Engine.raw_connection()``),
in autocommit. Errors are raised as SQLAlchemy's, so callers translate them exactly
as every other statement's. While anyone listens to the engine's cursor events
(tracing, a statement count in a test), the statements go through
``Connection.exec_driver_sql()`` instead, so the listener sees every one of them.

Each call is its own transaction, so one that PostgreSQL rolled back to break a
deadlock or a serialization conflict (SQLSTATE class 40) changed nothing and is sent
again: such a conflict between two workers' statements is transient, and raised from
a claim it would stop the worker ("Unrecoverable error").
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa

Row = tuple[Any, ...]
Settings = tuple[tuple[str, str], ...]
T = TypeVar("T")

SET_LOCAL = "SELECT pg_catalog.set_config(%s, %s, true)"

ROLLBACK_RETRIES = 5
"""Times a statement rolled back by the server (deadlock, serialization) is sent again."""


@dataclass(frozen=True, slots=True)
class Call:
    """One statement of :mod:`~celery_pgqueue.store.queries` with its parameters."""

    sql: str
    params: dict[str, Any]

    def rows(self, conn: sa.Connection) -> list[Row]:
        """Run on a SQLAlchemy connection (a caller's transaction)."""
        result = conn.exec_driver_sql(self.sql, self.params)
        return [tuple(r) for r in result] if result.returns_rows else []

    def first(self, conn: sa.Connection) -> Row | None:
        rows = self.rows(conn)
        return rows[0] if rows else None

    def rowcount(self, conn: sa.Connection) -> int:
        return int(conn.exec_driver_sql(self.sql, self.params).rowcount)


def _again(run: Callable[[], T]) -> T:
    """``run()``, again after a short random pause while the server rolls it back."""
    for attempt in range(ROLLBACK_RETRIES - 1):
        try:
            return run()
        except sa.exc.DBAPIError as exc:
            if not (getattr(exc.orig, "sqlstate", None) or "").startswith("40"):
                raise
        time.sleep(random.uniform(0.0, 0.005 * 2**attempt))
    return run()


def _fetch(cursor: psycopg.Cursor[Any]) -> list[Row]:
    return cursor.fetchall() if cursor.description is not None else []


def _count(cursor: psycopg.Cursor[Any]) -> int:
    return cursor.rowcount


class HotPath:
    """Runs :class:`Call` objects in autocommit on ``engine``'s pool."""

    def __init__(self, engine: sa.Engine, autocommit: sa.Engine) -> None:
        self.engine = engine
        self.autocommit = autocommit

    def rows(self, call: Call, settings: Settings = (), after: Call | None = None) -> list[Row]:
        """The rows ``call`` returns (empty for a statement without RETURNING).

        ``settings``: server settings (name, value) for this statement's transaction
        only, e.g. a role's own ``synchronous_commit`` on a pool shared with another.
        ``after``: a statement run first in the same transaction (a lock ``call`` needs
        held), still one round trip; ``call`` then starts after it has finished, so it
        sees (under READ COMMITTED) everything committed before ``after`` returned.
        """
        if self.observed():
            return _again(lambda: self.through_sqlalchemy(call, settings, Call.rows, after))
        return _again(lambda: self.send(call, settings, _fetch, after))

    def rowcount(self, call: Call, settings: Settings = ()) -> int:
        """The number of rows ``call`` changed."""
        if self.observed():
            return _again(lambda: self.through_sqlalchemy(call, settings, Call.rowcount))
        return _again(lambda: self.send(call, settings, _count))

    def observed(self) -> bool:
        """Whether a listener waits for the engine's cursor events."""
        dispatch = self.engine.dispatch
        return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute)

    def through_sqlalchemy(
        self,
        call: Call,
        settings: Settings,
        run: Callable[[Call, sa.Connection], T],
        after: Call | None = None,
    ) -> T:
        opened = self.engine.begin() if settings or after else self.autocommit.connect()
        with opened as conn:
            for setting in settings:
                conn.exec_driver_sql(SET_LOCAL, setting)
            if after is not None:
                after.rows(conn)
            return run(call, conn)

    def send(
        self,
        call: Call,
        settings: Settings,
        collect: Callable[[Any], T],
        after: Call | None = None,
    ) -> T:
        fairy = self.checkout()
        dbapi: Any = fairy.driver_connection
        try:
            dbapi.autocommit = True
            if settings or after is not None:
                # One round trip still: in a pipeline the statements share the implicit
                # transaction that ends at its sync, so a setting lasts exactly as long
                # as the statement's commit, and so does a lock ``after`` took. The
                # server runs them one after the other and commits without waiting for
                # us: the transaction never sits idle holding the lock.
                # The results are read once the pipeline has synced: inside it a cursor
                # has no description yet, and its rows would read as none.
                with dbapi.pipeline():
                    for setting in settings:
                        dbapi.execute(SET_LOCAL, setting)
                    if after is not None:
                        dbapi.execute(after.sql, after.params)
                    cursor = dbapi.execute(call.sql, call.params)
                return collect(cursor)
            return collect(dbapi.execute(call.sql, call.params))
        except psycopg.Error as exc:
            error: Any = exc  # SQLAlchemy types it as its own DBAPI protocol
            lost = bool(self.engine.dialect.is_disconnect(error, dbapi, None) or dbapi.closed)
            if lost:
                fairy.invalidate(exc)
                # As SQLAlchemy does: every connection older than this failure is
                # suspect (a restarted server closed them all), not only this one.
                self.engine.dispose()
            raise sa.exc.DBAPIError.instance(
                call.sql,
                call.params,
                exc,
                psycopg.Error,
                hide_parameters=True,
                connection_invalidated=lost,
                dialect=self.engine.dialect,
            ) from exc
        except BaseException as exc:
            fairy.invalidate(exc)  # interrupted mid-exchange: the session's state is unknown
            raise
        finally:
            if fairy.is_valid:
                try:
                    dbapi.autocommit = False  # as the pool hands connections out
                except psycopg.Error as exc:
                    fairy.invalidate(exc)
            fairy.close()

    def checkout(self) -> sa.PoolProxiedConnection:
        """A pooled connection; a failure to connect raised as SQLAlchemy's error."""
        try:
            return self.engine.raw_connection()
        except psycopg.Error as exc:
            raise sa.exc.DBAPIError.instance(
                None,
                None,
                exc,
                psycopg.Error,
                connection_invalidated=True,
                dialect=self.engine.dialect,
            ) from exc
