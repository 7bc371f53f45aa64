"""``pgqueue status|pause|resume|set-priority|set-limit|purge``: queues and their counts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import click

from celery_pgqueue.cli.output import age, lease_left, print_json, table
from celery_pgqueue.cli.runtime import current_runtime, database_options, json_option


@click.command()
@database_options
@json_option
@click.option("--all", "show_all", is_flag=True, help="Include Celery's transient queues.")
@click.option("--running", "show_running", is_flag=True, help="Also list running jobs.")
def status(as_json: bool, show_all: bool, show_running: bool) -> None:
    """Per queue: state, counts by status, ages, lapsed leases, throughput.

    Transient queues (remote-control mailboxes, replies, event receivers: queues
    declared with an expiry) are hidden unless --all.
    """
    store = current_runtime().store()
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
        print_json(document)
        return
    click.echo(f"{store.url.masked()}  schema {store.options.schema}")
    if not queues:
        click.echo("no queues yet (a queue appears when a task is first sent to it)")
    else:
        headers = (
            "QUEUE",
            "STATE",
            "PRIO",
            "LIMIT",
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
                "-" if q.concurrency_limit is None else str(q.concurrency_limit),
                str(q.queued),
                str(q.ready),
                str(q.scheduled),
                str(q.running),
                str(q.completed),
                str(q.failed),
                str(q.cancelled),
                age(q.oldest_ready_seconds),
                age(q.longest_running_seconds),
                str(q.expired_leases),
                f"{q.per_minute_5m:g}",
                str(q.failed_1h),
            )
            for q in queues
        ]
        click.echo(table(headers, rows, left={0, 1}))
    if running is not None:
        click.echo("")
        if not running:
            click.echo("no running jobs")
            return
        click.echo(
            table(
                ("ID", "QUEUE", "TASK", "ATTEMPT", "WORKER", "RUNNING FOR", "LEASE LEFT"),
                [
                    (
                        str(r.id),
                        r.queue_name,
                        r.task or "-",
                        str(r.attempt),
                        r.lease_owner or "-",
                        age(r.running_seconds),
                        lease_left(r.lease_remaining_seconds),
                    )
                    for r in running
                ],
                left={0, 1, 2, 4},
            )
        )


@click.command()
@database_options
@click.argument("queues", nargs=-1, required=True)
def pause(queues: tuple[str, ...]) -> None:
    """Stop workers from taking jobs of QUEUES (running jobs finish; sending still works)."""
    _set_active(queues, active=False)


@click.command()
@database_options
@click.argument("queues", nargs=-1, required=True)
def resume(queues: tuple[str, ...]) -> None:
    """Let workers take jobs of QUEUES again (wakes them at once)."""
    _set_active(queues, active=True)


def _set_active(names: Iterable[str], *, active: bool) -> None:
    """Resume only queues that exist; pause creates a queue no task was sent to yet.

    Every name is checked before any is changed.
    """
    store = current_runtime().store()
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


@click.command("set-priority")
@database_options
@click.argument("queue")
@click.argument("priority", type=int)
def set_priority(queue: str, priority: int) -> None:
    """Set QUEUE's default priority (lower runs sooner) for jobs sent without one."""
    store = current_runtime().store()
    before = store.queue(queue)["default_priority"]
    store.set_queue_priority(queue, priority)
    click.echo(
        f"default priority of {queue}: {before} -> {priority} "
        "(applies to jobs sent from now on without a priority)"
    )


class LimitType(click.ParamType[int | None]):
    """A concurrency limit on the command line: a whole number from 0, or ``none``."""

    name = "N|none"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | None:
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip()
        if text.lower() == "none":
            return None
        if text.startswith("-") and text[1:].isdigit():
            self.fail(
                f"a limit cannot be negative (got {text}): give a whole number from 0, "
                "or none to remove the limit",
                param,
                ctx,
            )
        if not (text.isascii() and text.isdigit()):
            self.fail(
                f"{value!r} is not a limit: give a whole number from 0, "
                "or none to remove the limit",
                param,
                ctx,
            )
        return int(text)


# ignore_unknown_options: "-1" reaches LimitType (and its message), not "no such option".
@click.command("set-limit", context_settings={"ignore_unknown_options": True})
@database_options
@click.argument("queue")
@click.argument("limit", type=LimitType())
def set_limit(queue: str, limit: int | None) -> None:
    """Let at most LIMIT jobs of QUEUE run at once across all workers (none: no limit).

    Jobs count from the claim, so tasks a worker prefetched count too. Running jobs are
    never stopped: a lower limit applies as they finish.
    """
    store = current_runtime().store()
    before = store.queue(queue)["concurrency_limit"]
    store.set_queue_limit(queue, limit)
    shown = "none" if limit is None else str(limit)
    meaning = (
        "no limit: any number may run at once"
        if limit is None
        else f"at most {limit} running at once across all workers"
    )
    click.echo(
        f"concurrency limit of {queue}: {'none' if before is None else before} -> {shown} "
        f"({meaning})"
    )


@click.command()
@database_options
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(queue: str, yes: bool) -> None:
    """Delete QUEUE's waiting jobs, due or scheduled (running jobs are left alone)."""
    store = current_runtime().store()
    store.queue(queue)
    waiting = store.count_waiting(queue)
    if waiting == 0:
        click.echo(f"{queue} has no waiting jobs; nothing to do")
        return
    if not yes:
        click.confirm(f"Delete {waiting} waiting job(s) from {queue}?", abort=True)
    click.echo(f"purged {store.purge(queue)} waiting job(s) from {queue}")
