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

One module per command group (``migrations``, ``queues``, ``jobs``, ``changes``,
``retention``, ``schedule``, ``metrics``); ``group`` is the ``pgqueue`` click group,
``runtime`` what every command shares (database, errors, options), ``output`` how
they print.
"""

from __future__ import annotations

from celery_pgqueue.cli import changes, jobs, metrics, migrations, queues, retention, schedule
from celery_pgqueue.cli.group import main, pgqueue

for command in (
    migrations.migrate,
    migrations.downgrade,
    migrations.current,
    queues.status,
    queues.pause,
    queues.resume,
    queues.set_priority,
    queues.set_limit,
    queues.purge,
    jobs.jobs,
    jobs.show,
    changes.cancel,
    changes.retry,
    retention.prune,
    retention.maintain,
    schedule.schedule,
    metrics.metrics,
):
    pgqueue.add_command(command)

__all__ = ["main", "pgqueue"]
