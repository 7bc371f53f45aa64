"""The per-task statements, executed by psycopg without SQLAlchemy's per-call work.

The statements themselves are still built with SQLAlchemy Core, in their modules
(``jobs.py``); this is about running them. Executing a cached statement through
SQLAlchemy costs about 0.2 ms of CPU on top of psycopg (checkout events, the
autocommit switch and its reset, parameter processing, result wrapping): as much as
the round trip itself, paid three times per task (publish, claim, finish). Here the
first execution of each statement shape goes through SQLAlchemy as usual; the SQL
text it sent, its constant parameters and its bind processors are kept, and later
executions send that text with psycopg on a connection of the same pool. Errors are
raised as SQLAlchemy's, so callers translate them exactly as before. While any event
listener is registered on the engine, everything goes through SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa

Row = tuple[Any, ...]
Settings = tuple[tuple[str, str], ...]

SET_LOCAL = "SELECT pg_catalog.set_config(%s, %s, true)"


@dataclass(frozen=True, slots=True)
class Call:
    """One statement with its parameters.

    ``literals``: values rendered into the SQL text rather than bound (a literal
    LIMIT), so each value is a statement shape of its own.
    """

    stmt: sa.Executable
    params: dict[str, Any]
    literals: tuple[Hashable, ...] = ()

    def rows(self, conn: sa.Connection) -> list[Row]:
        """Run on a SQLAlchemy connection (a caller's transaction)."""
        result = conn.execute(self.stmt, self.params)
        return [tuple(r) for r in result] if result.returns_rows else []

    def first(self, conn: sa.Connection) -> Row | None:
        rows = self.rows(conn)
        return rows[0] if rows else None


@dataclass(frozen=True, slots=True)
class _Shape:
    sql: str
    constants: dict[str, Any]
    processors: dict[str, Callable[[Any], Any]] = field(default_factory=dict)

    def parameters(self, params: dict[str, Any]) -> dict[str, Any]:
        sent = dict(self.constants)
        for name, value in params.items():
            process = self.processors.get(name)
            sent[name] = value if process is None else process(value)
        return sent


class HotPath:
    """Runs :class:`Call` objects in autocommit on ``engine``'s pool."""

    def __init__(self, engine: sa.Engine, autocommit: sa.Engine) -> None:
        self._engine = engine
        self._autocommit = autocommit
        # Written once per shape; a race only learns the same shape twice.
        self._shapes: dict[tuple[Any, ...], _Shape] = {}

    def rows(self, call: Call, settings: Settings = ()) -> list[Row]:
        """The rows ``call`` returns (empty for a statement without RETURNING).

        ``settings``: server settings (name, value) for this statement's transaction
        only, e.g. a role's own ``synchronous_commit`` on a pool shared with another.
        """
        key = (call.stmt, call.literals)
        shape = self._shapes.get(key)
        if shape is None or self._engine._has_events:
            # Someone listens on the engine (tracing, a statement count): they see
            # every statement, as SQLAlchemy runs it.
            return self._learn(key, call, settings)
        return self._send(shape, call.params, settings)

    def _learn(self, key: tuple[Any, ...], call: Call, settings: Settings) -> list[Row]:
        opened = self._engine.begin() if settings else self._autocommit.connect()
        with opened as conn:
            for name, value in settings:
                conn.execute(sa.select(sa.func.set_config(name, value, sa.true())))
            result = conn.execute(call.stmt, call.params)
            rows = [tuple(r) for r in result] if result.returns_rows else []
            context: Any = result.context
        sent = context.parameters[0] if context.parameters else {}
        if not isinstance(sent, dict):  # a positional paramstyle: keep SQLAlchemy
            return rows
        compiled = context.compiled
        processors = {
            name: proc
            for name, proc in (getattr(compiled, "_bind_processors", None) or {}).items()
            if name in call.params
        }
        constants = {k: v for k, v in sent.items() if k not in call.params}
        self._shapes[key] = _Shape(str(context.statement), constants, processors)
        return rows

    def _send(self, shape: _Shape, params: dict[str, Any], settings: Settings) -> list[Row]:
        fairy = _checkout(self._engine)
        dbapi: Any = fairy.driver_connection
        sent = shape.parameters(params)
        try:
            dbapi.autocommit = True
            if settings:
                # One round trip still: in a pipeline both statements share the implicit
                # transaction that ends at its sync, so the setting lasts exactly as
                # long as the statement's commit.
                with dbapi.pipeline():
                    for name, value in settings:
                        dbapi.execute(SET_LOCAL, (name, value))
                    cursor = dbapi.execute(shape.sql, sent)
                    return cursor.fetchall() if cursor.description is not None else []
            cursor = dbapi.execute(shape.sql, sent)
            return cursor.fetchall() if cursor.description is not None else []
        except psycopg.Error as exc:
            error: Any = exc
            lost = bool(self._engine.dialect.is_disconnect(error, dbapi, None) or dbapi.closed)
            if lost:
                # As SQLAlchemy does: every connection older than this failure is
                # suspect (a restarted server closed them all), not only this one.
                self._engine.pool._invalidate(fairy, exc)
            raise sa.exc.DBAPIError.instance(
                shape.sql,
                sent,
                exc,
                psycopg.Error,
                hide_parameters=True,
                connection_invalidated=lost,
                dialect=self._engine.dialect,
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


def _checkout(engine: sa.Engine) -> Any:
    """A pooled connection; a failure to connect raised as SQLAlchemy's error."""
    try:
        return engine.raw_connection()
    except psycopg.Error as exc:
        raise sa.exc.DBAPIError.instance(
            None, None, exc, psycopg.Error, connection_invalidated=True, dialect=engine.dialect
        ) from exc
