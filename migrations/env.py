"""Alembic environment for celery-pgqueue's own tables.

Runs only through :mod:`celery_pgqueue.migrate`, which passes the connection (online)
or the URL (offline ``--sql``) and the validated schema name in ``config.attributes``.
The version table is ``celery_pgqueue_version`` so the application's own Alembic
history (``alembic_version``) is never touched.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from celery_pgqueue.store.schema import VERSION_TABLE

config = context.config
schema: str = config.attributes.get("schema", "public")


def _quoted(name: str) -> str:
    # Any name PostgreSQL accepts (validated by PgQueueOptions: at most 63 bytes, no NUL).
    return '"' + name.replace('"', '""') + '"'


def run_offline() -> None:
    context.configure(
        url=config.attributes["url"],
        literal_binds=True,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.execute(f"CREATE SCHEMA IF NOT EXISTS {_quoted(schema)}")
        context.execute(f"SET LOCAL search_path TO {_quoted(schema)}")
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        # Even with IF NOT EXISTS, CREATE SCHEMA needs CREATE on the database: a
        # migrating role given only a schema (public, or one made for it) skips it.
        exists = connection.execute(
            sa.text("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = :schema"),
            {"schema": schema},
        ).first()
        if exists is None:
            connection.exec_driver_sql(f"CREATE SCHEMA {_quoted(schema)}")
        connection.exec_driver_sql(f"SET LOCAL search_path TO {_quoted(schema)}")
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
