"""``pgqueue migrate|downgrade|current``: the schema's revision."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from celery_pgqueue.cli.runtime import (
    SchemaNotReady,
    UsageProblem,
    current_runtime,
    database_options,
)


@click.command()
@database_options
@click.option("--sql", is_flag=True, help="Print the DDL instead of running it (no database).")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def migrate(sql: bool, revision: str) -> None:
    """Create or upgrade the tables (safe to run again)."""
    from celery_pgqueue import migrate as migration

    runtime = current_runtime()
    if sql:
        schema = runtime.options().schema
        click.echo(_alembic(lambda: migration.upgrade_sql(schema=schema, revision=revision)))
        return
    url, options = runtime.settings()
    before = migration.current(url.libpq_url(), schema=options.schema)
    _alembic(lambda: migration.upgrade(url.libpq_url(), revision, schema=options.schema))
    after = migration.current(url.libpq_url(), schema=options.schema)
    where = f"{url.masked()} (schema {options.schema})"
    if before == after:
        click.echo(f"{where} is already at revision {after}; nothing to do")
    else:
        click.echo(f"migrated {where}: {before or 'empty'} -> {after}")


@click.command()
@database_options
@click.option("--revision", default="base", show_default=True, help="Target revision.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def downgrade(revision: str, yes: bool) -> None:
    """Go back to an older revision; 'base' drops every celery-pgqueue table."""
    from celery_pgqueue import migrate as migration

    url, options = current_runtime().settings()
    before = migration.current(url.libpq_url(), schema=options.schema)
    where = f"{url.masked()} (schema {options.schema})"
    if before is None:
        click.echo(f"{where} has no celery-pgqueue tables; nothing to do")
        return
    if not yes:
        loss = (
            "This drops every celery-pgqueue table and the jobs in them."
            if revision == "base"
            else "Tables and columns added after it are dropped with their data."
        )
        click.confirm(f"Downgrade {where} from {before} to {revision}? {loss}", abort=True)
    _alembic(lambda: migration.downgrade(url.libpq_url(), revision, schema=options.schema))
    after = migration.current(url.libpq_url(), schema=options.schema)
    click.echo(f"downgraded {where}: {before} -> {after or 'base'}")


@click.command()
@database_options
@click.option("--check", is_flag=True, help="Exit 5 unless the database is at head.")
def current(check: bool) -> None:
    """Print the database's revision and the newest this version ships."""
    from celery_pgqueue import migrate as migration

    url, options = current_runtime().settings()
    now = migration.current(url.libpq_url(), schema=options.schema)
    head = migration.head_revision()
    click.echo(f"current: {now or 'none (not migrated)'}")
    click.echo(f"head:    {head}")
    if check and now != head:
        from celery_pgqueue.errors import MIGRATE_HINT

        raise SchemaNotReady(f"{url.masked()} is not at head: {MIGRATE_HINT}")


def _alembic(step: Callable[[], Any]) -> Any:
    """Run a migration step; Alembic's own errors (unknown revision…) are usage errors."""
    from alembic.util import CommandError as AlembicError

    try:
        return step()
    except AlembicError as exc:
        raise UsageProblem(f"alembic: {exc}") from exc
