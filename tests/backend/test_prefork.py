"""The backend in a real ``celery worker -P prefork``: results written by forked children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery, chord
from helpers import wait_until

from .conftest import pgqueue_url, release_database_clients, rows

pytestmark = [pytest.mark.worker, pytest.mark.slow]

APP_MODULE = textwrap.dedent(
    """
    import os
    from celery import Celery

    app = Celery("forked", broker=os.environ["CPQ_URL"], backend=os.environ["CPQ_URL"])
    app.conf.update(task_default_queue="forked", worker_hijack_root_logger=False)

    @app.task(name="f.add", shared=False)
    def add(x, y):
        return x + y

    @app.task(name="f.tsum", shared=False)
    def tsum(values):
        return sum(values)

    @app.task(name="f.flaky", shared=False, bind=True, max_retries=3)
    def flaky(self, times):
        if self.request.retries < times:
            raise self.retry(exc=KeyError("again"), countdown=0)
        return os.getpid()
    """
)


@pytest.fixture
def prefork_worker(tmp_path: Path, database_url: str) -> Iterator[Celery]:
    (tmp_path / "forked_app.py").write_text(APP_MODULE)
    url = pgqueue_url(database_url)
    env = dict(os.environ, CPQ_URL=url, PYTHONPATH=str(tmp_path))
    worker = subprocess.Popen(
        [
            sys.executable, "-m", "celery", "-A", "forked_app", "worker",
            "-P", "prefork", "-c", "2", "--loglevel", "WARNING",
            "--without-mingle", "--without-gossip", "--without-heartbeat",
        ],
        cwd=tmp_path,
        env=env,
    )  # fmt: skip
    client = Celery("client", broker=url, backend=url, set_as_current=False)
    client.conf.update(task_default_queue="forked")
    try:
        yield client
    finally:
        client.close()
        release_database_clients()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_forked_children_store_results_retries_and_chords(
    prefork_worker: Celery, database_url: str
) -> None:
    app = prefork_worker
    assert app.send_task("f.add", (2, 3)).get(timeout=60) == 5

    retried = app.send_task("f.flaky", (2,))
    child_pid = retried.get(timeout=30)
    assert child_pid != os.getpid()
    # Retry re-publishes before its RETRY write: with countdown=0 the other child can
    # finish the next attempt first, so the earlier log row closes a moment later.
    wait_until(
        lambda: (
            rows(
                database_url,
                "SELECT status FROM job_logs WHERE job_id = %s ORDER BY attempt_number",
                retried.id,
            )
            == [("retry",), ("retry",), ("success",)]
        ),
        timeout=10,
    )

    header = [app.signature("f.add", (i, i)) for i in range(20)]
    result = chord(header, app.signature("f.tsum"))()
    assert result.get(timeout=30) == sum(2 * i for i in range(20))
