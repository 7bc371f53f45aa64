"""Statements about the schema itself: the migrated revision, its channels, NOTIFY."""

from __future__ import annotations

import sqlalchemy as sa

VERSION_TABLE = "celery_pgqueue_version"

# The newest migration this code needs. A test keeps it equal to Alembic's head, so
# workers can check the schema without importing Alembic at startup.
REQUIRED_REVISION = "0007"


def current_revision(conn: sa.Connection, *, schema: str) -> str | None:
    """The Alembic revision recorded in ``<schema>.celery_pgqueue_version``, if any."""
    qualified = sa.func.quote_ident(schema).concat("." + VERSION_TABLE)
    exists = conn.execute(sa.select(sa.func.to_regclass(qualified).is_not(None))).scalar_one()
    if not exists:
        return None
    version = sa.table(VERSION_TABLE, sa.column("version_num"), schema=schema)
    return conn.execute(sa.select(version.c.version_num).limit(1)).scalar()


def channel_names(conn: sa.Connection) -> dict[str, str]:
    """``purpose -> channel name`` from ``job_channels`` (see ``notify.Channels``)."""
    from celery_pgqueue.store.tables import job_channels

    rows = conn.execute(sa.select(job_channels.c.purpose, job_channels.c.name))
    return {str(purpose): str(name) for purpose, name in rows}


def ping(conn: sa.Connection) -> None:
    """The cheapest round trip: proves the server answers on this connection now."""
    conn.execute(sa.select(sa.literal(1))).scalar_one()


def set_local(conn: sa.Connection, *, name: str, value: str) -> None:
    """Set a server setting until this transaction ends (``SET LOCAL``, with parameters)."""
    conn.execute(sa.select(sa.func.set_config(name, value, sa.true())))


def notify(conn: sa.Connection, *, channel: str, payload: str) -> None:
    """Send a NOTIFY, delivered when the transaction commits."""
    conn.execute(sa.select(sa.func.pg_notify(channel, payload)))


def server_identity(conn: sa.Connection) -> tuple[str, str]:
    """``(database, server start time)``: equal only for the same database on one server."""
    row = conn.execute(
        sa.select(sa.func.current_database(), sa.func.pg_postmaster_start_time().cast(sa.Text))
    ).one()
    return str(row[0]), str(row[1])
