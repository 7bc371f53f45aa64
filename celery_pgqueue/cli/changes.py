"""``pgqueue cancel|retry``: change jobs by id, saying what became of each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
from uuid import UUID

import click

from celery_pgqueue.cli.jobs import JOB_ID
from celery_pgqueue.cli.runtime import CommandError, NotFound, current_runtime, database_options

if TYPE_CHECKING:
    from celery_pgqueue.store import Store

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


@click.command()
@database_options
@click.argument("job_ids", metavar="ID...", nargs=-1, required=True, type=JOB_ID)
def cancel(job_ids: tuple[UUID, ...]) -> None:
    """Cancel waiting jobs for good: no worker will ever run them.

    Only queued jobs can be cancelled; stop a running task with
    `celery -A proj control revoke --terminate ID`.
    """
    store = current_runtime().store()
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


@click.command()
@database_options
@click.argument("job_ids", metavar="ID...", nargs=-1, required=True, type=JOB_ID)
def retry(job_ids: tuple[UUID, ...]) -> None:
    """Put failed or cancelled jobs back in line now; their attempt history stays.

    Jobs cancelled by Celery's revoke() (or expired) are refused: workers remember
    revoked task ids and would cancel them again on sight.
    """
    store = current_runtime().store()
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
