"""What every command shares: where the database is, the errors and exit codes, options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from celery_pgqueue.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidQueueName,
    PgQueueError,
    SchemaMissing,
    UnknownJob,
    UnknownQueue,
)
from celery_pgqueue.options import app_database

if TYPE_CHECKING:
    from celery_pgqueue.options import DatabaseURL, PgQueueOptions
    from celery_pgqueue.store import Store

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4
EXIT_SCHEMA = 5

URL_ENV = "CELERY_PGQUEUE_URL"


class CommandError(click.ClickException):
    """A one-line error on stderr; each subclass carries its documented exit code."""

    exit_code = EXIT_REFUSED


class UsageProblem(CommandError):
    exit_code = EXIT_USAGE


class NotFound(CommandError):
    exit_code = EXIT_NOT_FOUND


class Unavailable(CommandError):
    exit_code = EXIT_UNAVAILABLE


class SchemaNotReady(CommandError):
    exit_code = EXIT_SCHEMA


# Our errors -> the CLI error that reports them, most specific first.
ERRORS: tuple[tuple[type[BaseException], type[CommandError]], ...] = (
    (UnknownQueue, NotFound),
    (UnknownJob, NotFound),
    (DatabaseUnavailable, Unavailable),
    (SchemaMissing, SchemaNotReady),
    (ConfigurationError, UsageProblem),
    (InvalidQueueName, UsageProblem),
    (PgQueueError, CommandError),
)


@dataclass
class Runtime:
    """Where the commands find their database: the Celery app, ``--url``, ``--schema``."""

    app: Any = None
    url: str | None = None
    schema: str | None = None
    traceback: bool = False
    _store: Store | None = field(default=None, repr=False)

    def settings(self) -> tuple[DatabaseURL, PgQueueOptions]:
        """The database URL and options, or a usage error saying where to set them."""
        from celery_pgqueue.options import DatabaseURL

        url = self.url
        if url is None and self.app is not None:
            found = app_database(self.app)
            if found is None:
                conf = self.app.conf
                raise UsageProblem(
                    "the Celery app uses no PostgreSQL database (broker_url "
                    f"{_shown(conf.broker_url)}, result_backend {_shown(conf.result_backend)}); "
                    "pass --url pgqueue://user:password@host:5432/dbname"
                )
            url = found[0]
        if url is None:
            raise UsageProblem(
                f"no database given: pass --url pgqueue://user:password@host:5432/dbname "
                f"(or set {URL_ENV}), or run it as `celery -A proj pgqueue …`"
            )
        return DatabaseURL.parse(url), self.options()

    def options(self) -> PgQueueOptions:
        """The app's transport options for its PostgreSQL URL, with ``--schema`` applied."""
        from celery_pgqueue.options import PgQueueOptions

        found = app_database(self.app) if self.app is not None else None
        raw = dict(found[1] or {}) if found is not None else {}
        if self.schema is not None:
            raw["schema"] = self.schema
        return PgQueueOptions.parse(raw)

    def store(self, *, check_schema: bool = True) -> Store:
        """The store for this command (one pool, disposed when the command ends)."""
        if self._store is None:
            from celery_pgqueue.store import Store

            url, options = self.settings()
            self._store = Store(url, options)
            click.get_current_context().call_on_close(self._store.dispose)
        if check_schema:
            self._store.check_schema()
        return self._store

    def completed_retention(self, options: PgQueueOptions) -> float:
        """The retention every path uses (:func:`celery_pgqueue.options.completed_retention`)."""
        from celery_pgqueue.options import completed_retention

        expires = getattr(self.app.conf, "result_expires", None) if self.app else None
        return completed_retention(options, expires)


def _shown(url: Any) -> str:
    from celery_pgqueue.options import first_url, mask_password

    text = first_url(url)
    return repr(mask_password(text)) if text else "unset"


def _set_url(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(Runtime).url = value


def _set_schema(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(Runtime).schema = value


URL_HELP = f"Database URL (pgqueue:// or postgresql://); overrides the app's. Env: {URL_ENV}."
SCHEMA_HELP = "PostgreSQL schema of the tables; overrides the 'schema' transport option."


def database_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--url`` and ``--schema`` on a subcommand too, so they can follow its name."""
    command = click.option(
        "--schema", metavar="NAME", help=SCHEMA_HELP, expose_value=False, callback=_set_schema
    )(command)
    return click.option(
        "--url", metavar="URL", help=URL_HELP, expose_value=False, callback=_set_url
    )(command)


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(command)


def current_runtime() -> Runtime:
    """The running command's :class:`Runtime`."""
    return click.get_current_context().ensure_object(Runtime)
