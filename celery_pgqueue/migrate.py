"""Alembic from Python: upgrade, downgrade, current revision, offline SQL.

The migrations ship inside the wheel (``celery_pgqueue/migrations``), so migrating works
from any directory with no checkout; in a source checkout they are read from
``<repo>/migrations``.
"""

from __future__ import annotations

import io
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from celery_pgqueue.errors import ConfigurationError, ConnectionRejected, DatabaseUnavailable
from celery_pgqueue.options import DatabaseURL, PgQueueOptions
from celery_pgqueue.store import connection_failure
from celery_pgqueue.store.schema import VERSION_TABLE


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed package, else the checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError(
        "celery-pgqueue's migrations are missing from this installation; reinstall the package"
    )


def _config(schema: str) -> Config:
    PgQueueOptions(schema=schema).validate()
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["schema"] = schema
    return cfg


def head_revision() -> str:
    """The newest revision this version of the package ships."""
    head = ScriptDirectory.from_config(_config("public")).get_current_head()
    assert head is not None
    return head


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(DatabaseURL.parse(url).sqlalchemy_url(), poolclass=sa.NullPool)


def _run(url: str, schema: str, action: str, revision: str) -> None:
    cfg = _config(schema)
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            getattr(command, action)(cfg, revision)
    except sa.exc.OperationalError as exc:
        failure = connection_failure(exc.orig or exc, DatabaseURL.parse(url))
        if isinstance(failure, ConnectionRejected):
            raise failure from exc
        raise DatabaseUnavailable(
            f"cannot migrate {DatabaseURL.parse(url).masked()}: {exc.orig}"
        ) from exc
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head", schema: str = "public") -> None:
    """Create or update the tier tables in ``schema``; safe to run again."""
    _run(url, schema, "upgrade", revision)


def downgrade(url: str, revision: str = "base", schema: str = "public") -> None:
    """Go back to ``revision``; ``base`` drops every tier table."""
    _run(url, schema, "downgrade", revision)


def current(url: str, schema: str = "public") -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
            )
            return ctx.get_current_revision()
    except sa.exc.OperationalError as exc:
        failure = connection_failure(exc.orig or exc, DatabaseURL.parse(url))
        if isinstance(failure, ConnectionRejected):
            raise failure from exc
        raise DatabaseUnavailable(
            f"cannot reach {DatabaseURL.parse(url).masked()}: {exc.orig}"
        ) from exc
    finally:
        engine.dispose()


def upgrade_sql(schema: str = "public", revision: str = "head") -> str:
    """The DDL ``upgrade`` would run, for DBAs who apply it themselves."""
    cfg = _config(schema)
    buffer = io.StringIO()
    cfg.output_buffer = buffer
    cfg.attributes["url"] = "postgresql+psycopg://"
    command.upgrade(cfg, revision, sql=True)
    return buffer.getvalue()
