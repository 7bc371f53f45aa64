"""Statements about the schema itself: the migrated revision, NOTIFY."""

from __future__ import annotations

import sqlalchemy as sa

VERSION_TABLE = "celery_pgqueue_version"

# The newest migration this code needs. A test keeps it equal to Alembic's head, so
# workers can check the schema without importing Alembic at startup.
REQUIRED_REVISION = "0004"


def current_revision(conn: sa.Connection, *, schema: str) -> str | None:
    """The Alembic revision recorded in ``<schema>.celery_pgqueue_version``, if any."""
    exists = conn.execute(
        sa.select(sa.func.to_regclass(sa.literal(f"{schema}.{VERSION_TABLE}")).is_not(None))
    ).scalar_one()
    if not exists:
        return None
    version = sa.table(VERSION_TABLE, sa.column("version_num"), schema=schema)
    return conn.execute(sa.select(version.c.version_num).limit(1)).scalar()


def ping(conn: sa.Connection) -> None:
    """The cheapest round trip: proves the server answers on this connection now."""
    conn.execute(sa.select(sa.literal(1))).scalar_one()


def notify(conn: sa.Connection, *, channel: str, payload: str) -> None:
    """Send a NOTIFY, delivered when the transaction commits."""
    conn.execute(sa.select(sa.func.pg_notify(channel, payload)))


def server_identity(conn: sa.Connection) -> tuple[str, str]:
    """``(database, server start time)``: equal only for the same database on one server."""
    row = conn.execute(
        sa.select(sa.func.current_database(), sa.func.pg_postmaster_start_time().cast(sa.Text))
    ).one()
    return str(row[0]), str(row[1])
