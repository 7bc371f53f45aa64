"""``pgqueue jobs|show``: find jobs and read one with its attempts."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import click

from celery_pgqueue.cli.output import DAY, age, clip, jsonable, print_json, table, when
from celery_pgqueue.cli.runtime import (
    UsageProblem,
    current_runtime,
    database_options,
    json_option,
)
from celery_pgqueue.errors import UnknownJob
from celery_pgqueue.states import JobStatus

if TYPE_CHECKING:
    from celery_pgqueue.store import JobRecord, Store

STATUSES = tuple(status.value for status in JobStatus)
MIN_PREFIX = 4  # hex digits of a job id prefix, as git asks of an abbreviated hash
MAX_CANDIDATES = 10  # ids listed for an ambiguous prefix
ATTEMPTS_LEGEND = (
    "ATTEMPTS: times a worker took the job / most it may take (max_retries + 1), when "
    "known; a retry() or a redelivery after a lost worker counts as a new attempt"
)


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


@click.command()
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
    if scheduled and statuses:
        raise UsageProblem("--scheduled lists queued jobs only: leave out --status")
    store = current_runtime().store()
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
        print_json([_job_document(j, payload=False) for j in found])
        return
    if not found:
        click.echo("no jobs match")
        return
    if scheduled:
        click.echo(
            table(
                ("ID", "QUEUE", "TASK", "RUN AT (UTC)", "PRIO", "ATTEMPTS"),
                [
                    (
                        str(j.id),
                        j.queue_name,
                        _task_of(j) or "-",
                        when(j.run_at),
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
        table(
            ("ID", "QUEUE", "STATUS", "TASK", "ATTEMPTS", "PRIO", "UPDATED (UTC)", "LAST ERROR"),
            [
                (
                    str(j.id),
                    j.queue_name,
                    j.status,
                    _task_of(j) or "-",
                    _attempts(j),
                    str(j.priority),
                    when(j.updated_at),
                    clip(j.last_error_message or "", 50) or "-",
                )
                for j in found
            ],
            left={0, 1, 2, 3, 6, 7},
        )
    )
    click.echo(f"\n{ATTEMPTS_LEGEND}")


@click.command()
@database_options
@json_option
@click.argument("job_ref", metavar="ID")
@click.option("--payload", is_flag=True, help="Also print the message payload and the result.")
def show(as_json: bool, job_ref: str, payload: bool) -> None:
    """One job and its attempts (job_logs). ID: a task id, or a unique prefix of a job id."""
    store = current_runtime().store()
    job = _find_job(store, job_ref)
    job_id = job.id
    attempts = store.attempts(job_id)
    if as_json:
        document = _job_document(job, payload=payload)
        document["attempts"] = [jsonable(asdict(a)) for a in attempts]
        print_json(document)
        return
    fields: list[tuple[str, str]] = [
        ("id", str(job.id)),
        ("queue", job.queue_name),
        ("status", job.status),
        ("task", _task_of(job) or "-"),
        ("priority", str(job.priority)),
        ("attempts", _attempts_explained(job)),
        ("run at", when(job.run_at)),
        ("created", when(job.created_at)),
        ("updated", when(job.updated_at)),
        ("started", when(job.started_at)),
        ("completed", when(job.completed_at)),
        ("failed", when(job.failed_at)),
    ]
    if job.lease_owner:
        fields.append(("lease", f"{job.lease_owner} until {when(job.lease_expires_at)}"))
    if job.acked_at:
        fields.append(("acked", when(job.acked_at)))
    if job.unique_key:
        fields.append(("unique key", job.unique_key))
    fields.append(("last error", job.last_error_message or "-"))
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        click.echo(f"{name + ':':<{width}} {value}")
    click.echo("")
    if attempts:
        click.echo("attempts (job_logs):")
        click.echo(
            table(
                ("#", "STATUS", "STARTED (UTC)", "FINISHED (UTC)", "DURATION", "MESSAGE"),
                [
                    (
                        str(a.attempt_number),
                        a.status,
                        when(a.started_at),
                        when(a.finished_at),
                        age(a.duration_seconds, precise=True),
                        clip(a.log_message or "", 80) or "-",
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
    document: dict[str, Any] = jsonable(asdict(job))
    document["task"] = _task_of(job)
    if not payload:
        # Payloads and results may carry data an operator listing has no need for.
        document.pop("payload", None)
        document.pop("result", None)
    return document
