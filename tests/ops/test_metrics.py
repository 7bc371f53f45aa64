"""Prometheus metrics: what a scrape shows, what it costs, and counters that only grow.

Scrapes go through the WSGI app (as an embedding web framework would call it) or, for
the command, over HTTP from a real ``celery -A app pgqueue metrics`` process. Rows are
put in their states through the store, the way workers do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import wait_until
from prometheus_client.parser import text_string_to_metric_families

from celery_pgqueue import maintenance
from celery_pgqueue.metrics import make_wsgi_app
from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.store import Store
from celery_pgqueue.store import metrics as metrics_sql
from ops.conftest import BIN, Jobs, pgqueue_url

Sql = Callable[..., list[tuple[Any, ...]]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(target: Any) -> Samples:
    """Call the WSGI app once; every sample by (name, sorted labels)."""
    wsgi = make_wsgi_app(target)
    status: list[str] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/metrics",
        "QUERY_STRING": "",
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }
    body = b"".join(wsgi(environ, lambda s, headers: status.append(s)))
    assert status[0].startswith("200"), status
    return parse(body.decode())


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def url(database_url: str) -> str:
    return pgqueue_url(database_url)


@pytest.fixture(autouse=True)
def _close_shared_stores() -> Iterator[None]:
    yield
    Store.close_all()


def test_a_scrape_shows_each_queues_waiting_ready_running_and_paused_state(
    url: str, jobs: Jobs, store: Store, sql: Sql
) -> None:
    waiting = [jobs.queued("default") for _ in range(4)]
    sql("UPDATE jobs SET run_at = now() - interval '90 seconds' WHERE queue_name = 'default'")
    sql("UPDATE jobs SET run_at = now() + interval '1 hour' WHERE id = %s", waiting[-1])
    jobs.running("busy")
    jobs.queued("paused-one")
    store.set_queue_active("paused-one", False)

    got = scrape(url)

    assert sample(got, "celery_pgqueue_up") == 1
    assert sample(got, "celery_pgqueue_jobs", queue="default", status="queued") == 4
    assert sample(got, "celery_pgqueue_jobs_ready", queue="default") == 3
    age = sample(got, "celery_pgqueue_oldest_ready_job_age_seconds", queue="default")
    assert age is not None and 90 <= age < 150
    assert sample(got, "celery_pgqueue_jobs", queue="busy", status="running") == 1
    assert sample(got, "celery_pgqueue_jobs", queue="busy", status="queued") == 0
    assert sample(got, "celery_pgqueue_oldest_ready_job_age_seconds", queue="busy") == 0
    assert sample(got, "celery_pgqueue_queue_paused", queue="paused-one") == 1
    assert sample(got, "celery_pgqueue_queue_paused", queue="default") == 0


def test_running_jobs_whose_lease_ran_out_are_shown_until_rescue_takes_them(
    url: str, jobs: Jobs, sql: Sql
) -> None:
    jobs.running("busy")
    sql("UPDATE jobs SET lease_expires_at = now() - interval '1 second'")

    assert sample(scrape(url), "celery_pgqueue_jobs_lease_expired", queue="busy") == 1


def test_transient_queues_replies_and_mailboxes_are_left_out(
    url: str, jobs: Jobs, sql: Sql
) -> None:
    jobs.queued("celery")
    jobs.queued("4b5c.reply.celery.pidbox")
    sql(
        "UPDATE job_queues SET expires_at = now() + interval '10 s' WHERE name = %s",
        "4b5c.reply.celery.pidbox",
    )

    queues = {dict(labels).get("queue") for (_, labels) in scrape(url)}

    assert "celery" in queues
    assert "4b5c.reply.celery.pidbox" not in queues


def finished(samples: Samples, status: str, queue: str = "default") -> float | None:
    return sample(samples, "celery_pgqueue_jobs_finished_total", queue=queue, status=status)


def test_finished_jobs_are_counted_once_by_maintenance_and_never_go_down(
    url: str, jobs: Jobs, store: Store, sql: Sql
) -> None:
    sql("UPDATE job_counters SET counted_until = now() - interval '1 minute'")  # migrated then
    done = [jobs.completed("default") for _ in range(3)]
    jobs.failed("default")
    jobs.cancelled("default")
    assert finished(scrape(url), "completed") == 0

    # Finished more than FOLD_LAG ago, as maintenance sees them a few seconds later.
    sql("UPDATE jobs SET updated_at = now() - interval '20 seconds'")
    maintenance.run_once(store, completed_retention=86_400)
    maintenance.run_once(store, completed_retention=86_400)  # counts nothing twice

    counted = scrape(url)
    assert finished(counted, "completed") == 3
    assert finished(counted, "failed") == 1
    assert finished(counted, "cancelled") == 1

    # forget() and retention delete the rows; the totals stay.
    store.delete(done[:1])
    sql("UPDATE jobs SET updated_at = now() - interval '8 days'")  # past failed_retention
    maintenance.run_once(store, completed_retention=3600)
    assert sql("SELECT count(*) FROM jobs") == [(0,)]
    after = scrape(url)
    assert (finished(after, "completed"), finished(after, "failed")) == (3, 1)


def test_a_job_that_finished_within_the_lag_is_counted_by_a_later_pass_once(
    url: str, jobs: Jobs, store: Store
) -> None:
    jobs.completed("default")
    maintenance.run_once(store, completed_retention=86_400)
    assert finished(scrape(url), "completed") == 0  # its commit may not be visible yet

    metrics_sql.fold(store, lag=0)  # the pass FOLD_LAG seconds later
    maintenance.run_once(store, completed_retention=86_400)

    assert finished(scrape(url), "completed") == 1


def test_lease_rescues_are_counted_by_outcome(url: str, jobs: Jobs, store: Store, sql: Sql) -> None:
    assert sample(scrape(url), "celery_pgqueue_lease_rescues_total", outcome="requeued") == 0
    jobs.running("default")
    jobs.running("default")
    sql(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 s', acked_at = now()"
        " WHERE id = (SELECT id FROM jobs LIMIT 1)"
    )
    sql("UPDATE jobs SET lease_expires_at = now() - interval '1 s'")

    maintenance.run_once(store, completed_retention=86_400)

    got = scrape(url)
    assert sample(got, "celery_pgqueue_lease_rescues_total", outcome="requeued") == 1
    assert sample(got, "celery_pgqueue_lease_rescues_total", outcome="failed") == 1


def test_a_scrape_runs_two_statements_whatever_the_number_of_queues(
    database_url: str, jobs: Jobs
) -> None:
    for n in range(20):
        jobs.queued(f"q{n}")
        jobs.running(f"q{n}")
    store = Store.for_url(pgqueue_url(database_url), PgQueueOptions())
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    scrape(pgqueue_url(database_url))

    assert len([s for s in statements if "job_" in s or "jobs" in s]) == 2, statements


def test_the_queue_state_reads_queued_and_running_jobs_through_their_partial_indexes(
    jobs: Jobs, sql: Sql
) -> None:
    """With finished jobs the bulk of the table, as retention keeps it."""
    jobs.queued("default")
    jobs.running("default")
    sql(
        "INSERT INTO jobs (id, queue_name, status, priority, updated_at, completed_at)"
        " SELECT gen_random_uuid(), 'default', 'completed', 100, now(), now()"
        " FROM generate_series(1, 20000)"
    )
    sql("ANALYZE jobs")

    plan = "\n".join(r[0] for r in sql("EXPLAIN " + _compiled(metrics_sql.queue_state)))

    # Running jobs: either partial index of running rows (ix_jobs_running, 0007, is
    # keyed by queue and the planner prefers it once it exists).
    assert "ix_jobs_ready" in plan, plan
    assert "ix_jobs_running" in plan or "ix_jobs_lease" in plan, plan
    assert "Seq Scan on jobs" not in plan, plan


def test_a_database_that_does_not_answer_gives_up_0_not_an_error() -> None:
    from celery_pgqueue.devserver_cluster import free_port

    got = scrape(f"pgqueue://postgres@127.0.0.1:{free_port()}/nothing")

    assert got == {("celery_pgqueue_up", ()): 0}


def test_the_metrics_command_serves_a_scrape_over_http_until_sigterm(
    tmp_path: Path, app_module: str, jobs: Jobs
) -> None:
    from celery_pgqueue.devserver_cluster import free_port

    jobs.queued("celery")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("CELERY_PGQUEUE_URL", None)
    server = subprocess.Popen(
        [
            str(BIN / "celery"),
            "-A",
            app_module,
            "pgqueue",
            "metrics",
            "--port",
            str(port),
            "--address",
            "127.0.0.1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = wait_until(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read(),
            timeout=60,
            ignore=(OSError,),
        )
        got = parse(body.decode())
        assert sample(got, "celery_pgqueue_jobs", queue="celery", status="queued") == 1
        assert sample(got, "celery_pgqueue_up") == 1
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert f"127.0.0.1:{port}/metrics" in out


def _compiled(statement_of: Callable[[Any], Any]) -> str:
    """The SQL text a store function sends, with its parameters inlined."""
    from sqlalchemy.dialects import postgresql

    captured: list[str] = []

    class Capture:
        def execute(self, stmt: Any, *args: Any) -> list[Any]:
            captured.append(
                str(
                    stmt.compile(
                        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
                    )
                )
            )
            return []

    statement_of(Capture())
    return captured[0]


@pytest.mark.slow
@pytest.mark.worker
def test_tasks_a_real_worker_ran_show_up_in_the_counters_within_seconds(
    tmp_path: Path, url: str, sql: Sql
) -> None:
    from transport_process.procs import Workers, task_specs, write_app

    sql("UPDATE job_counters SET counted_until = now() - interval '1 minute'")
    app = write_app(tmp_path, url, transport_options={"maintenance_interval": 1.0})
    workers = Workers()
    try:
        workers.start(app, "w1", pool="threads", concurrency=2)
        app.send(task_specs(5))
        app.close()

        # Counted by the worker's own maintenance once FOLD_LAG has passed.
        wait_until(
            lambda: finished(scrape(url), "completed", queue="celery") == 5,
            timeout=metrics_sql.FOLD_LAG + 30,
            interval=0.5,
        )
    finally:
        workers.reap_all()
    assert finished(scrape(url), "completed", queue="celery") == 5
