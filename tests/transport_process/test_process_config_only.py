"""``pgqueue://`` by configuration alone, and Celery's own CLI against it.

Nothing here imports ``celery_pgqueue``: the producer, the workers and the ``celery``
commands are separate processes configured only with a ``pgqueue://`` URL, as a user
would have them (issue #4 "Done when").
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest
from helpers import wait_until

from .procs import Database, Workers, libpq_url, pgqueue_url, task_specs, write_app

pytestmark = [pytest.mark.worker, pytest.mark.slow]

PASSWORD = "pgq-Secret-4e1f9"


def _password_url(database_url: str) -> str:
    """The test database as a pgqueue:// URL carrying a password.

    The suite's server may be trust-authenticated (any password is accepted over TCP)
    or have a real password in the URL already; either way the broker URL used here
    has a password for ``report`` to hide.
    """
    if ":" in database_url.split("://", 1)[1].split("@", 1)[0]:
        return pgqueue_url(database_url)
    url = pgqueue_url(database_url, password=PASSWORD)
    try:
        psycopg.connect(libpq_url(url), connect_timeout=5).close()
    except psycopg.OperationalError as exc:  # pragma: no cover - depends on pg_hba
        pytest.skip(f"the test server refuses a made-up password ({exc}); needs trust auth")
    return url


def _password_of(url: str) -> str:
    return url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


def test_a_plain_script_publishes_by_url_alone_and_a_worker_runs_it(
    tmp_path: Path, database_url: str, db: Database, workers: Workers
) -> None:
    broker = _password_url(database_url)
    script = tmp_path / "plain_producer.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            from celery import Celery

            app = Celery("proc", broker={broker!r})

            @app.task(name="proc.record", shared=False)
            def record(sleep=0.0, label=""):
                pass

            imported_before = "celery_pgqueue" in sys.modules
            result = record.delay(label="plain")
            print(json.dumps({{"id": result.id, "imported_before": imported_before}}))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    sent = json.loads(done.stdout.strip().splitlines()[-1])
    assert sent["imported_before"] is False, "the script itself must not need our package"
    assert "import celery_pgqueue" not in script.read_text()

    row = db.job(sent["id"])
    assert row is not None, "publishing by URL alone inserted no row"
    assert row["status"] == "queued"
    assert row["payload"]["headers"]["task"] == "proc.record"

    app = write_app(tmp_path, broker)
    assert "celery_pgqueue" not in (tmp_path / "procapp.py").read_text()
    workers.start(app, "w1")
    wait_until(lambda: db.status(sent["id"]) == "completed", timeout=30)
    assert [e.event for e in app.record.events(sent["id"])] == ["run"]


def test_celery_report_does_not_show_the_broker_password(tmp_path: Path, database_url: str) -> None:
    broker = _password_url(database_url)
    password = _password_of(broker)
    app = write_app(tmp_path, broker)

    done = app.celery("report")

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "pgqueue://" in output, "report should name the broker (masked)"
    assert password not in output


def test_a_worker_with_a_password_url_shows_it_nowhere(
    tmp_path: Path, database_url: str, db: Database, workers: Workers
) -> None:
    """Not in its log at DEBUG, nor in ``inspect conf``, ``report`` or ``pgqueue status``.

    The password is in the broker URL and the result backend URL, and a task fails so
    the log also carries a traceback.
    """
    broker = _password_url(database_url)
    password = _password_of(broker)
    app = write_app(tmp_path, broker, result_backend=broker)
    worker = workers.start(app, "secretive", "--loglevel", "DEBUG")
    [ok] = task_specs(1, label="ok")
    [boom] = task_specs(1, label="boom")
    boom["kwargs"]["sleep"] = "not a number"  # time.sleep() raises TypeError in the task
    app.publish([ok, boom])
    wait_until(lambda: db.status(ok["id"]) == "completed", timeout=30)
    wait_until(lambda: db.status(boom["id"]) == "failed", timeout=30)

    def conf_answered() -> str | None:
        done = app.celery("inspect", "conf", "--json")
        return done.stdout if "broker_url" in done.stdout else None

    conf = wait_until(conf_answered, timeout=30, interval=0.2, message="inspect conf answered")
    outputs = {
        "inspect conf": conf,
        "report": app.celery("report").stdout,
        "pgqueue status": app.celery("pgqueue", "status").stdout,
    }
    worker.reap()
    outputs["worker log"] = worker.log()

    assert "pgqueue://postgres:**@" in outputs["worker log"]
    [settings] = json.loads(conf.strip().splitlines()[-1]).values()
    assert settings["broker_url"].startswith("pgqueue://postgres:**@"), settings["broker_url"]
    assert settings["result_backend"].startswith("pgqueue://postgres:***"), settings
    assert "TypeError" in outputs["worker log"], "the failing task's traceback is logged"
    for name, text in outputs.items():
        assert text, f"{name} printed nothing"
        assert password not in text, f"{name} shows the password"


def test_inspect_ping_is_answered_by_two_workers(
    tmp_path: Path, broker_url: str, workers: Workers, measure
) -> None:
    app = write_app(tmp_path, broker_url)
    w1 = workers.start(app, "w1", wait=False)
    w2 = workers.start(app, "w2", wait=False)
    workers.wait_ready([w1, w2])
    attempts: list[dict[str, object]] = []

    def both_answer() -> bool:
        # Celery's default --timeout (1 s): what a user typing the command gets.
        done = app.celery("inspect", "ping", "--json")
        try:
            replies = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout else {}
        except json.JSONDecodeError:
            replies = {}
        attempts.append(replies)
        return {name.split("@", 1)[0] for name in replies} == {"w1", "w2"}

    wait_until(both_answer, timeout=30, interval=0.2, message="w1 and w2 answer inspect ping")
    assert all(reply == {"ok": "pong"} for reply in attempts[-1].values())
    measure(f"inspect ping answered by both workers on attempt {len(attempts)}")


def test_celery_purge_empties_the_queue(tmp_path: Path, broker_url: str, db: Database) -> None:
    app = write_app(tmp_path, broker_url)
    app.publish(task_specs(25))
    assert db.task_counts() == {"queued": 25}

    done = app.celery("purge", "-f")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "25" in done.stdout, done.stdout
    assert db.task_counts() == {}


def test_control_revoke_cancels_the_queued_row_and_it_never_runs(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers
) -> None:
    app = write_app(tmp_path, broker_url)
    [doomed] = task_specs(1, label="doomed")
    app.publish([doomed])

    app.celery("control", "revoke", doomed["id"])  # no worker is up: nobody replies

    assert db.status(doomed["id"]) == "cancelled"

    for run in (1, 2):  # a worker, then a restarted one, which remembers no revokes
        worker = workers.start(app, f"w{run}")
        [sentinel] = task_specs(1, label=f"after-start-{run}")
        app.publish([sentinel])
        # The sentinel was published after the revoked task: once it has run, the
        # worker has had every chance to claim the revoked one too.
        wait_until(lambda s=sentinel: db.status(s["id"]) == "completed", timeout=30)
        assert app.record.events(doomed["id"]) == []
        assert db.status(doomed["id"]) == "cancelled"
        worker.reap()
