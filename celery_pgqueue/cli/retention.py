"""``pgqueue prune|maintain``: retention and one maintenance pass, e.g. from cron."""

from __future__ import annotations

from dataclasses import asdict

import click

from celery_pgqueue.cli.output import age, print_json
from celery_pgqueue.cli.runtime import current_runtime, database_options, json_option


@click.command()
@database_options
@json_option
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
def prune(as_json: bool, dry_run: bool) -> None:
    """Delete finished jobs and job_logs rows past retention, in short batches.

    Completed and cancelled jobs are kept for completed_retention (else the app's
    result_expires, else 1 day), failed jobs for failed_retention, log rows for
    log_retention and at most max_logs_per_job per job.
    """
    runtime = current_runtime()
    store = runtime.store()
    retention = runtime.completed_retention(store.options)
    counts = (
        store.prunable(completed_retention=retention)
        if dry_run
        else store.prune(completed_retention=retention)
    )
    opts = store.options
    if as_json:
        print_json(
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
        f"retention: completed/cancelled {age(retention)}, failed "
        f"{age(opts.failed_retention)}, logs {age(opts.log_retention)} "
        f"(at most {opts.max_logs_per_job} per job)"
    )


@click.command()
@database_options
@json_option
def maintain(as_json: bool) -> None:
    """Run one full maintenance pass now (workers run it every maintenance_interval).

    Rescues jobs whose lease lapsed, drops expired messages and queues, and prunes
    past retention. For deployments where no pgqueue worker runs, e.g. from cron.
    """
    from celery_pgqueue.maintenance import run_once

    runtime = current_runtime()
    store = runtime.store()
    report = run_once(
        store,
        completed_retention=runtime.completed_retention(store.options),
        time_budget=float("inf"),
    )
    if as_json:
        print_json(asdict(report))
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
