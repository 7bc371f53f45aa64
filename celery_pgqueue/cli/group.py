"""The ``pgqueue`` click group: our errors become one line and a documented exit code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import click

from celery_pgqueue.cli.runtime import (
    ERRORS,
    EXIT_OK,
    SCHEMA_HELP,
    URL_ENV,
    URL_HELP,
    CommandError,
    Runtime,
)
from celery_pgqueue.errors import first_line


class PgQueueGroup(click.Group):
    """Turns our exceptions into one line on stderr and a documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            runtime = ctx.find_object(Runtime)
            if runtime is not None and runtime.traceback:
                raise
            for kind, error in ERRORS:
                if isinstance(exc, kind):
                    # libpq's messages span lines ("Is the server running…?"): keep one.
                    raise error(" ".join(str(exc).split())) from exc
            raise CommandError(
                f"unexpected {type(exc).__name__}: {first_line(exc)} "
                "(run with --traceback for details)"
            ) from exc


@click.group(cls=PgQueueGroup)
@click.option("--url", envvar=URL_ENV, metavar="URL", help=URL_HELP)
@click.option("--schema", metavar="NAME", help=SCHEMA_HELP)
@click.option("--traceback", is_flag=True, help="Show the traceback of unexpected errors.")
@click.pass_context
def pgqueue(
    ctx: click.Context, /, url: str | None, schema: str | None, traceback: bool, **_: Any
) -> None:
    """Operate celery-pgqueue: migrations, queue status, jobs, retention."""
    parent = ctx.obj
    # Under `celery -A proj`, ctx.obj is Celery's CLIContext, which carries the app.
    app = parent.app if isinstance(parent, Runtime) else getattr(parent, "app", None)
    ctx.obj = Runtime(app=app, url=url, schema=schema, traceback=traceback)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """``celery-pgqueue`` and ``python -m celery_pgqueue``: the same commands, no app."""
    pgqueue.main(
        args=list(argv) if argv is not None else None,
        prog_name="celery-pgqueue",
        obj=Runtime(),
    )
    raise SystemExit(EXIT_OK)  # pragma: no cover - click's main always exits
