"""Operate the queue tier from a shell: ``celery -A proj pgqueue …`` or ``celery-pgqueue``.

Under Celery (the ``celery.commands`` entry point) the database is the app's
``broker_url`` when it is a PostgreSQL URL, else its ``result_backend``, and options
come from the matching ``broker_transport_options`` or
``result_backend_transport_options``. The standalone ``celery-pgqueue`` (and
``python -m celery_pgqueue``) has no app: it needs ``--url`` or
``CELERY_PGQUEUE_URL``. Either way ``--url`` wins, and only the URL is read from the
app: no Kombu connection is opened.

Celery imports this module for every ``celery …`` command (entry points load
eagerly), so it imports nothing heavy at module level.

Exit codes: 0 ok; 1 refused (confirmation declined, or a job's status does not allow
the change); 2 usage (bad option, argument, URL or configuration, a login the server
refuses for good, an ambiguous job id prefix); 3 not found (unknown queue or job id);
4 database unavailable; 5 schema missing or outdated.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn
from uuid import UUID

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
    from celery_pgqueue.store import JobRecord, Store

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4
EXIT_SCHEMA = 5

URL_ENV = "CELERY_PGQUEUE_URL"
DAY = 86_400.0
STATUSES = ("queued", "running", "completed", "failed", "cancelled")
MIN_PREFIX = 4  # hex digits of a job id prefix, as git asks of an abbreviated hash
MAX_CANDIDATES = 10  # ids listed for an ambiguous prefix
ATTEMPTS_LEGEND = (
    "ATTEMPTS: times a worker took the job / most it may take (max_retries + 1), when "
    "known; a retry() or a redelivery after a lost worker counts as a new attempt"
)
REVOKED_REFUSALS = {
    "revoked": (
        "it was cancelled by revoke(): workers remember revoked ids (for 3 hours by "
        "default, across restarts with --statedb) and would cancel it again; send the "
        "task again instead"
    ),
    "expired": (
        "it expired: its message carries an expiry time that has passed, so a worker "
        "would drop it again; send the task again instead"
    ),
}


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
                f"unexpected {type(exc).__name__}: {_first_line(exc)} "
                "(run with --traceback for details)"
            ) from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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


def _runtime() -> Runtime:
    return click.get_current_context().ensure_object(Runtime)


# -- migrations ---------------------------------------------------------------------


@pgqueue.command()
@database_options
@click.option("--sql", is_flag=True, help="Print the DDL instead of running it (no database).")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def migrate(sql: bool, revision: str) -> None:
    """Create or upgrade the tables (safe to run again)."""
    from celery_pgqueue import migrate as migration

    runtime = _runtime()
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


@pgqueue.command()
@database_options
@click.option("--revision", default="base", show_default=True, help="Target revision.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def downgrade(revision: str, yes: bool) -> None:
    """Go back to an older revision; 'base' drops every celery-pgqueue table."""
    from celery_pgqueue import migrate as migration

    url, options = _runtime().settings()
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


@pgqueue.command()
@database_options
@click.option("--check", is_flag=True, help="Exit 5 unless the database is at head.")
def current(check: bool) -> None:
    """Print the database's revision and the newest this version ships."""
    from celery_pgqueue import migrate as migration

    url, options = _runtime().settings()
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


# -- queues ---------------------------------------------------------------------------


@pgqueue.command()
@database_options
@json_option
@click.option("--all", "show_all", is_flag=True, help="Include Celery's transient queues.")
@click.option("--running", "show_running", is_flag=True, help="Also list running jobs.")
def status(as_json: bool, show_all: bool, show_running: bool) -> None:
    """Per queue: state, counts by status, ages, lapsed leases, throughput.

    Transient queues (remote-control mailboxes, replies, event receivers: queues
    declared with an expiry) are hidden unless --all.
    """
    store = _runtime().store()
    queues = store.queue_status(include_transient=show_all)
    running = store.running_jobs(limit=20) if show_running else None
    if as_json:
        document: dict[str, Any] = {
            "database": store.url.masked(),
            "schema": store.options.schema,
            "queues": [asdict(q) for q in queues],
        }
        if running is not None:
            document["running"] = [asdict(r) for r in running]
        _print_json(document)
        return
    click.echo(f"{store.url.masked()}  schema {store.options.schema}")
    if not queues:
        click.echo("no queues yet (a queue appears when a task is first sent to it)")
    else:
        headers = (
            "QUEUE",
            "STATE",
            "PRIO",
            "QUEUED",
            "READY",
            "SCHEDULED",
            "RUNNING",
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "OLDEST READY",
            "LONGEST RUN",
            "LAPSED LEASES",
            "PER MIN (5M)",
            "FAILED (1H)",
        )
        rows = [
            (
                q.name,
                "active" if q.is_active else "paused",
                str(q.default_priority),
                str(q.queued),
                str(q.ready),
                str(q.scheduled),
                str(q.running),
                str(q.completed),
                str(q.failed),
                str(q.cancelled),
                _age(q.oldest_ready_seconds),
                _age(q.longest_running_seconds),
                str(q.expired_leases),
                f"{q.per_minute_5m:g}",
                str(q.failed_1h),
            )
            for q in queues
        ]
        click.echo(_table(headers, rows, left={0, 1}))
    if running is not None:
        click.echo("")
        if not running:
            click.echo("no running jobs")
            return
        click.echo(
            _table(
                ("ID", "QUEUE", "TASK", "ATTEMPT", "WORKER", "RUNNING FOR", "LEASE LEFT"),
                [
                    (
                        str(r.id),
                        r.queue_name,
                        r.task or "-",
                        str(r.attempt),
                        r.lease_owner or "-",
                        _age(r.running_seconds),
                        _lease_left(r.lease_remaining_seconds),
                    )
                    for r in running
                ],
                left={0, 1, 2, 4},
            )
        )


@pgqueue.command()
@database_options
@click.argument("queues", nargs=-1, required=True)
def pause(queues: tuple[str, ...]) -> None:
    """Stop workers from taking jobs of QUEUES (running jobs finish; sending still works)."""
    _set_active(queues, active=False)


@pgqueue.command()
@database_options
@click.argument("queues", nargs=-1, required=True)
def resume(queues: tuple[str, ...]) -> None:
    """Let workers take jobs of QUEUES again (wakes them at once)."""
    _set_active(queues, active=True)


def _set_active(names: Iterable[str], *, active: bool) -> None:
    """Resume only queues that exist; pause creates a queue no task was sent to yet.

    Every name is checked before any is changed.
    """
    store = _runtime().store()
    names = list(dict.fromkeys(names))
    existing = {queue["name"] for queue in store.queues()}
    new = [name for name in names if name not in existing]
    if active and new:
        raise store.unknown_queue(new[0])
    # As celery_pgqueue.api.pause: a queue paused before its first task stays paused.
    store.ensure_queues(new)
    for name in names:
        store.set_queue_active(name, active)
        note = " (a new queue: no task was sent to it yet)" if name in new else ""
        click.echo(f"{'resumed' if active else 'paused'} {name}{note}")


@pgqueue.command("set-priority")
@database_options
@click.argument("queue")
@click.argument("priority", type=int)
def set_priority(queue: str, priority: int) -> None:
    """Set QUEUE's default priority (lower runs sooner) for jobs sent without one."""
    store = _runtime().store()
    before = store.queue(queue)["default_priority"]
    store.set_queue_priority(queue, priority)
    click.echo(
        f"default priority of {queue}: {before} -> {priority} "
        "(applies to jobs sent from now on without a priority)"
    )


@pgqueue.command()
@database_options
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(queue: str, yes: bool) -> None:
    """Delete QUEUE's waiting jobs, due or scheduled (running jobs are left alone)."""
    store = _runtime().store()
    store.queue(queue)
    waiting = store.count_waiting(queue)
    if waiting == 0:
        click.echo(f"{queue} has no waiting jobs; nothing to do")
        return
    if not yes:
        click.confirm(f"Delete {waiting} waiting job(s) from {queue}?", abort=True)
    click.echo(f"purged {store.purge(queue)} waiting job(s) from {queue}")


# -- jobs -----------------------------------------------------------------------------


class JobIdType(click.ParamType[UUID]):
    """A Celery task id: a UUID, or any other id (mapped as the transport maps it)."""

    name = "ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> UUID:
        if isinstance(value, UUID):
            return value
        text = str(value).strip()
        if not text:
            self.fail("a job id can't be empty", param, ctx)
        from celery_pgqueue.ids import job_id_for

        return job_id_for(text)


class SinceType(click.ParamType[float | datetime]):
    """``30s``, ``10m``, ``2h``, ``1d``, ``1w`` ago, or an ISO time (naive means UTC)."""

    name = "SINCE"
    UNITS = {"s": 1, "m": 60, "h": 3600, "d": DAY, "w": 7 * DAY}
    PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float | datetime:
        if isinstance(value, float | datetime):
            return value
        text = str(value)
        match = self.PATTERN.match(text)
        if match:
            return float(match.group(1)) * self.UNITS[match.group(2).lower()]
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            self.fail(
                f"{text!r} is neither a duration (30s, 10m, 2h, 1d, 1w) nor an ISO time "
                "(2026-11-25T14:00:00Z)",
                param,
                ctx,
            )
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


JOB_ID = JobIdType()


@pgqueue.command()
@database_options
@json_option
@click.option("--queue", "queues", multiple=True, help="Only this queue (repeatable).")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUSES, case_sensitive=False),
    help="Only this status (repeatable).",
)
@click.option("--task", help="Only this task name (payload->'headers'->>'task').")
@click.option(
    "--since",
    type=SinceType(),
    help="Only jobs changed since: a duration ago (10m, 2h, 1d) or an ISO time (UTC if naive).",
)
@click.option(
    "--scheduled",
    is_flag=True,
    help="Only queued jobs not due yet (countdown, ETA, retry delay), soonest first: "
    "what `celery inspect scheduled` shows on other brokers.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Most rows."
)
def jobs(
    as_json: bool,
    queues: tuple[str, ...],
    statuses: tuple[str, ...],
    task: str | None,
    since: float | datetime | None,
    scheduled: bool,
    limit: int,
) -> None:
    """List jobs, most recently changed first (with --scheduled: soonest due first)."""
    from celery_pgqueue.states import JobStatus

    if scheduled and statuses:
        raise UsageProblem("--scheduled lists queued jobs only: leave out --status")
    store = _runtime().store()
    found = store.find_jobs(
        queues=queues,
        statuses=[JobStatus(s.lower()) for s in statuses],
        task=task,
        changed_within=since if isinstance(since, float) else None,
        changed_since=since if isinstance(since, datetime) else None,
        scheduled=scheduled,
        limit=limit,
    )
    if as_json:
        _print_json([_job_document(j, payload=False) for j in found])
        return
    if not found:
        click.echo("no jobs match")
        return
    if scheduled:
        click.echo(
            _table(
                ("ID", "QUEUE", "TASK", "RUN AT (UTC)", "PRIO", "ATTEMPTS"),
                [
                    (
                        str(j.id),
                        j.queue_name,
                        _task_of(j) or "-",
                        _when(j.run_at),
                        str(j.priority),
                        _attempts(j),
                    )
                    for j in found
                ],
                left={0, 1, 2, 3},
            )
        )
        return
    click.echo(
        _table(
            ("ID", "QUEUE", "STATUS", "TASK", "ATTEMPTS", "PRIO", "UPDATED (UTC)", "LAST ERROR"),
            [
                (
                    str(j.id),
                    j.queue_name,
                    j.status,
                    _task_of(j) or "-",
                    _attempts(j),
                    str(j.priority),
                    _when(j.updated_at),
                    _clip(j.last_error_message or "", 50) or "-",
                )
                for j in found
            ],
            left={0, 1, 2, 3, 6, 7},
        )
    )
    click.echo(f"\n{ATTEMPTS_LEGEND}")


@pgqueue.command()
@database_options
@json_option
@click.argument("job_ref", metavar="ID")
@click.option("--payload", is_flag=True, help="Also print the message payload and the result.")
def show(as_json: bool, job_ref: str, payload: bool) -> None:
    """One job and its attempts (job_logs). ID: a task id, or a unique prefix of a job id."""
    store = _runtime().store()
    job = _find_job(store, job_ref)
    job_id = job.id
    attempts = store.attempts(job_id)
    if as_json:
        document = _job_document(job, payload=payload)
        document["attempts"] = [_jsonable(asdict(a)) for a in attempts]
        _print_json(document)
        return
    fields: list[tuple[str, str]] = [
        ("id", str(job.id)),
        ("queue", job.queue_name),
        ("status", job.status),
        ("task", _task_of(job) or "-"),
        ("priority", str(job.priority)),
        ("attempts", _attempts_explained(job)),
        ("run at", _when(job.run_at)),
        ("created", _when(job.created_at)),
        ("updated", _when(job.updated_at)),
        ("started", _when(job.started_at)),
        ("completed", _when(job.completed_at)),
        ("failed", _when(job.failed_at)),
    ]
    if job.lease_owner:
        fields.append(("lease", f"{job.lease_owner} until {_when(job.lease_expires_at)}"))
    if job.acked_at:
        fields.append(("acked", _when(job.acked_at)))
    fields.append(("last error", job.last_error_message or "-"))
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        click.echo(f"{name + ':':<{width}} {value}")
    click.echo("")
    if attempts:
        click.echo("attempts (job_logs):")
        click.echo(
            _table(
                ("#", "STATUS", "STARTED (UTC)", "FINISHED (UTC)", "DURATION", "MESSAGE"),
                [
                    (
                        str(a.attempt_number),
                        a.status,
                        _when(a.started_at),
                        _when(a.finished_at),
                        _age(a.duration_seconds, precise=True),
                        _clip(a.log_message or "", 80) or "-",
                    )
                    for a in attempts
                ],
                left={1, 2, 3, 5},
            )
        )
    else:
        click.echo("no attempts recorded (never claimed, or pruned by retention)")
    if payload:
        click.echo("")
        click.echo("payload:")
        click.echo(json.dumps(job.payload, indent=2, sort_keys=True, default=str))
        click.echo("result:")
        click.echo(json.dumps(job.result, indent=2, sort_keys=True, default=str))


@pgqueue.command()
@database_options
@click.argument("job_ids", metavar="ID...", nargs=-1, required=True, type=JOB_ID)
def cancel(job_ids: tuple[UUID, ...]) -> None:
    """Cancel waiting jobs for good: no worker will ever run them.

    Only queued jobs can be cancelled; stop a running task with
    `celery -A proj control revoke --terminate ID`.
    """
    store = _runtime().store()
    _change_jobs(
        store,
        job_ids,
        verb="cancelled",
        allowed=("queued",),
        change=store.cancel,
        refusal=(
            "only queued jobs can be cancelled "
            "(stop a running task with `celery control revoke --terminate ID`)"
        ),
    )


@pgqueue.command()
@database_options
@click.argument("job_ids", metavar="ID...", nargs=-1, required=True, type=JOB_ID)
def retry(job_ids: tuple[UUID, ...]) -> None:
    """Put failed or cancelled jobs back in line now; their attempt history stays.

    Jobs cancelled by Celery's revoke() (or expired) are refused: workers remember
    revoked task ids and would cancel them again on sight.
    """
    store = _runtime().store()
    _change_jobs(
        store,
        job_ids,
        verb="requeued",
        allowed=("failed", "cancelled"),
        change=store.retry,
        refusal="only failed or cancelled jobs can be retried",
        vetoes=lambda ids: {
            job_id: REVOKED_REFUSALS[why] for job_id, why in store.revoked_jobs(ids).items()
        },
    )


def _change_jobs(
    store: Store,
    job_ids: Sequence[UUID],
    *,
    verb: str,
    allowed: Sequence[str],
    change: Callable[[Sequence[UUID]], int],
    refusal: str,
    vetoes: Callable[[list[UUID]], dict[UUID, str]] | None = None,
) -> None:
    """Apply ``change`` to the ids whose status allows it; say what became of each.

    ``vetoes`` names, with the reason, jobs whose status allows the change but that
    must not get it. Exit code: 3 if any id is unknown, else 1 if any was refused,
    else 0.
    """
    ids = list(dict.fromkeys(job_ids))
    before = store.job_statuses(ids)
    eligible = [i for i in ids if before.get(i) in allowed]
    vetoed = vetoes(eligible) if vetoes is not None and eligible else {}
    eligible = [i for i in eligible if i not in vetoed]
    if eligible:
        change(eligible)
    after = store.job_statuses(ids)
    missing = refused = 0
    for job_id in ids:
        was, now = before.get(job_id), after.get(job_id)
        if was is None:
            missing += 1
            click.echo(f"{job_id}: no such job", err=True)
        elif job_id in vetoed:
            refused += 1
            click.echo(f"{job_id}: not {verb}: {vetoed[job_id]}", err=True)
        elif job_id in eligible and now != was:
            click.echo(f"{verb} {job_id}")
        elif job_id in eligible:
            refused += 1
            click.echo(f"{job_id}: not {verb}: it has no message to run again", err=True)
        else:
            refused += 1
            click.echo(f"{job_id}: not {verb}: it is {was}; {refusal}", err=True)
    if missing:
        raise NotFound(f"{missing} of {len(ids)} job id(s) not found")
    if refused:
        raise CommandError(f"{refused} of {len(ids)} job(s) not {verb}")


# -- retention and maintenance ------------------------------------------------------


@pgqueue.command()
@database_options
@json_option
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
def prune(as_json: bool, dry_run: bool) -> None:
    """Delete finished jobs and job_logs rows past retention, in short batches.

    Completed and cancelled jobs are kept for completed_retention (else the app's
    result_expires, else 1 day), failed jobs for failed_retention, log rows for
    log_retention and at most max_logs_per_job per job.
    """
    runtime = _runtime()
    store = runtime.store()
    retention = runtime.completed_retention(store.options)
    counts = (
        store.prunable(completed_retention=retention)
        if dry_run
        else store.prune(completed_retention=retention)
    )
    opts = store.options
    if as_json:
        _print_json(
            {
                "dry_run": dry_run,
                "pruned": asdict(counts),
                "retention_seconds": {
                    "completed": retention,
                    "cancelled": retention,
                    "failed": opts.failed_retention,
                    "logs": opts.log_retention,
                },
                "max_logs_per_job": opts.max_logs_per_job,
            }
        )
        return
    click.echo(
        f"{'would prune' if dry_run else 'pruned'}: {counts.completed} completed, "
        f"{counts.cancelled} cancelled, {counts.failed} failed job(s), "
        f"{counts.logs} log row(s)"
    )
    click.echo(
        f"retention: completed/cancelled {_age(retention)}, failed "
        f"{_age(opts.failed_retention)}, logs {_age(opts.log_retention)} "
        f"(at most {opts.max_logs_per_job} per job)"
    )


@pgqueue.command()
@database_options
@json_option
def maintain(as_json: bool) -> None:
    """Run one full maintenance pass now (workers run it every maintenance_interval).

    Rescues jobs whose lease lapsed, drops expired messages and queues, and prunes
    past retention. For deployments where no pgqueue worker runs, e.g. from cron.
    """
    from celery_pgqueue.maintenance import run_once

    runtime = _runtime()
    store = runtime.store()
    report = run_once(
        store,
        completed_retention=runtime.completed_retention(store.options),
        time_budget=float("inf"),
    )
    if as_json:
        _print_json(asdict(report))
        return
    if not report.ran:
        click.echo("another process is running maintenance right now; nothing done")
        return
    p = report.pruned
    click.echo(
        f"rescued {report.rescued} job(s) (failed {report.rescued_failed}), cancelled "
        f"{report.expired_tasks} expired task(s), dropped "
        f"{report.expired_messages} expired message(s) and {report.expired_queues} "
        f"expired queue(s), pruned {p.completed} completed, {p.cancelled} cancelled, "
        f"{p.failed} failed job(s) and {p.logs} log row(s) in {report.seconds:g}s"
    )


# -- formatting -----------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: set[int]) -> str:
    """An aligned plain-text table: text columns left, numbers right."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i in left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _age(seconds: float | None, *, precise: bool = False) -> str:
    """``42s``, ``3m05s``, ``2h03m``, ``3d04h``; ``-`` for none."""
    if seconds is None:
        return "-"
    if precise and seconds < 10:
        return f"{seconds:.3f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < DAY:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86_400}d{s % 86_400 // 3600:02d}h"


def _lease_left(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0:
        return f"lapsed {_age(-seconds)} ago"
    return _age(seconds)


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _attempts(job: JobRecord) -> str:
    return f"{job.attempt_count}/{job.max_attempts}" if job.max_attempts else str(job.attempt_count)


def _attempts_explained(job: JobRecord) -> str:
    if job.max_attempts:
        return (
            f"{job.attempt_count} of at most {job.max_attempts} "
            "(times a worker took it; max_retries + 1)"
        )
    return f"{job.attempt_count} (times a worker took it)"


def _find_job(store: Store, text: str) -> JobRecord:
    """The job ``text`` names: a task id (UUID or custom), else a unique id prefix.

    Like git's abbreviated hashes: at least 4 hex digits (dashes allowed); an
    ambiguous prefix is a usage error that lists the candidates.
    """
    job_id = JOB_ID.convert(text, None, None)
    job = store.job(job_id)
    if job is not None:
        return job
    if _is_full_uuid(text):
        raise UnknownJob(f"no job with id {job_id}")
    digits = text.strip().replace("-", "")
    if len(digits) >= MIN_PREFIX and re.fullmatch(r"[0-9a-fA-F]{1,32}", digits):
        found = store.job_ids_with_prefix(text.strip(), limit=MAX_CANDIDATES + 1)
        if len(found) > 1:
            shown = ", ".join(str(i) for i in found[:MAX_CANDIDATES])
            more = " and more" if len(found) > MAX_CANDIDATES else ""
            raise UsageProblem(
                f"job id prefix {text.strip()!r} is ambiguous: it matches {shown}{more}; "
                "give more of the id"
            )
        if found:
            job = store.job(found[0])
            if job is not None:
                return job
    raise UnknownJob(f"no job with id or id prefix {text.strip()!r}")


def _is_full_uuid(text: str) -> bool:
    try:
        UUID(text.strip())
    except ValueError:
        return False
    return True


def _task_of(job: JobRecord) -> str | None:
    payload = job.payload if isinstance(job.payload, dict) else {}
    headers = payload.get("headers")
    task = headers.get("task") if isinstance(headers, dict) else None
    return task if isinstance(task, str) else None


def _job_document(job: JobRecord, *, payload: bool) -> dict[str, Any]:
    document: dict[str, Any] = _jsonable(asdict(job))
    document["task"] = _task_of(job)
    if not payload:
        # Payloads and results may carry data an operator listing has no need for.
        document.pop("payload", None)
        document.pop("result", None)
    return document


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value


def _print_json(document: Any) -> None:
    click.echo(json.dumps(_jsonable(document), indent=2, sort_keys=True, default=str))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])


# Commands kept in modules of their own (they import this one: register them last).
from celery_pgqueue.cli_metrics import metrics as _metrics_command  # noqa: E402
from celery_pgqueue.cli_schedule import schedule as _schedule_group  # noqa: E402

pgqueue.add_command(_schedule_group)
pgqueue.add_command(_metrics_command)
