"""``pgqueue schedule list|enable|disable``: periodic task entries kept by the beat.

Registered into the ``pgqueue`` group by :mod:`celery_pgqueue.cli`. Under
``celery -A proj`` the commands act on the app's schedule (``pgqueue_beat_name``,
else the app's main name); the standalone ``celery-pgqueue`` lists every schedule in
the database and finds an entry by its name (``--beat`` when two schedules share it).
A change is seen by the leading beat at its next lease renewal (0.2 x
``pgqueue_beat_lease_seconds``: 2 s by default), without a restart.
"""

from __future__ import annotations

from dataclasses import asdict

import click

from celery_pgqueue.cli.output import print_json, table, when
from celery_pgqueue.cli.runtime import NotFound, current_runtime, database_options, json_option
from celery_pgqueue.errors import UnknownScheduleEntry

BEAT_HELP = "The schedule (pgqueue_beat_name); default: the app's, or every one."


def _beat_name(given: str | None) -> str | None:
    if given is not None:
        return given
    app = current_runtime().app
    if app is None:
        return None
    name = app.conf.get("pgqueue_beat_name") or app.main or "default"
    return str(name)


@click.group()
def schedule() -> None:
    """Periodic task entries of celery_pgqueue.beat.Scheduler: list, enable, disable."""


@schedule.command("list")
@database_options
@json_option
@click.option("--beat", "beat", metavar="NAME", help=BEAT_HELP)
def list_entries(as_json: bool, beat: str | None) -> None:
    """Every entry with its state, and which beat process leads."""
    from celery_pgqueue.store import schedule as schedule_sql

    store = current_runtime().store()
    beat_name = _beat_name(beat)
    entries, leases = schedule_sql.list_entries(store, beat_name)
    if as_json:
        print_json(
            {
                "database": store.url.masked(),
                "schedules": [asdict(lease) for lease in leases],
                "entries": [asdict(e) for e in entries],
            }
        )
        return
    click.echo(store.url.masked())
    if not entries:
        where = f"schedule {beat_name!r}" if beat_name else "this database"
        click.echo(
            f"no periodic task entries in {where} (a beat using "
            "celery_pgqueue.beat:Scheduler writes them when it starts)"
        )
        return
    names = sorted({e.beat_name for e in entries})
    held = {lease.beat_name: lease for lease in leases}
    for name in names:
        lease = held.get(name)
        if lease is None or lease.expires_in <= 0:
            leader = "no beat leads it now"
        else:
            leader = (
                f"led by {lease.holder} (fence {lease.fence}), lease renewed "
                f"{when(lease.renewed_at)}"
            )
        click.echo(f"schedule {name!r}: {leader}")
    several = len(names) > 1
    headers: tuple[str, ...] = (
        "NAME",
        "TASK",
        "SCHEDULE",
        "ENABLED",
        "LAST RUN",
        "NEXT RUN",
        "RUNS",
        "LAST JOB",
    )
    rows: list[tuple[str, ...]] = [
        (
            e.name,
            e.task,
            e.schedule,
            "yes" if e.enabled else "no",
            when(e.last_run_at),
            when(e.next_run_at) if e.enabled else "-",
            str(e.total_run_count),
            str(e.last_job_id) if e.last_job_id else "-",
        )
        for e in entries
    ]
    if several:
        headers = ("BEAT", *headers)
        rows = [(e.beat_name, *row) for e, row in zip(entries, rows, strict=True)]
    click.echo(table(headers, rows, left=set(range(len(headers))) - {len(headers) - 2}))


@schedule.command()
@database_options
@click.argument("name")
@click.option("--beat", "beat", metavar="NAME", help=BEAT_HELP)
def enable(name: str, beat: str | None) -> None:
    """Let the beat send entry NAME again (if it fell due meanwhile, it is sent once)."""
    _set(name, beat, enabled=True)


@schedule.command()
@database_options
@click.argument("name")
@click.option("--beat", "beat", metavar="NAME", help=BEAT_HELP)
def disable(name: str, beat: str | None) -> None:
    """Stop the beat from sending entry NAME (kept in the table; enable brings it back)."""
    _set(name, beat, enabled=False)


def _set(name: str, beat: str | None, *, enabled: bool) -> None:
    from celery_pgqueue.store import schedule as schedule_sql

    store = current_runtime().store()
    try:
        beat_name = schedule_sql.enable(store, name, enabled, _beat_name(beat))
    except UnknownScheduleEntry as exc:
        raise NotFound(str(exc)) from exc
    click.echo(f"{'enabled' if enabled else 'disabled'} {name} (schedule {beat_name!r})")
