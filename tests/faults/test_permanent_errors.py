"""Refusals that retrying cannot fix stop at once with a named error; the rest are retried.

A private server (its ``pg_hba.conf`` is edited) refuses in each of the ways a new
deployment meets: a database or role that does not exist, a ``pg_hba.conf`` rule, a
server that requires SSL, a URL that requires SSL from a server without it. Each must
reach the user as a named error, from ``.delay()``, from a real ``celery worker``
(which exits non-zero) and from the CLI (exit 2), never as a reconnect loop; and a
full server (too many connections) must still be waited out.
"""

from __future__ import annotations

import subprocess
import sys
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from celery import Celery
from helpers import wait_until, with_database
from kombu.exceptions import OperationalError as KombuOperationalError
from transport_process.procs import Database, Worker, Workers, task_specs, write_app

from celery_pgqueue import migrate
from celery_pgqueue.devserver import EmbeddedPostgres
from celery_pgqueue.errors import (
    AuthenticationFailed,
    ConnectionRejected,
    DatabaseNotFound,
    DatabaseUnavailable,
)
from celery_pgqueue.store import Store

SECRET = "S3cret-never-shown-4f1e"


@dataclass(frozen=True)
class Refusal:
    user: str
    database: str
    query: str
    error: type[ConnectionRejected]
    server_says: str  # the server's (or libpq's) reason, quoted in our message
    fix: str  # what our message tells the user to change
    password: str | None = SECRET

    def url(self, port: int) -> str:
        auth = self.user if self.password is None else f"{self.user}:{self.password}"
        return f"pgqueue://{auth}@127.0.0.1:{port}/{self.database}{self.query}"


REFUSALS = {
    "missing-database": Refusal(
        "postgres", "no_such_db", "", DatabaseNotFound,
        'database "no_such_db" does not exist', "create the database",
    ),
    "missing-role": Refusal(
        "no_such_role", "app", "", AuthenticationFailed,
        'role "no_such_role" does not exist', "pg_hba.conf",
    ),
    "pg_hba-reject": Refusal(
        "blocked", "app", "", AuthenticationFailed,
        "pg_hba.conf rejects connection", "pg_hba.conf",
    ),
    "server-requires-ssl": Refusal(
        "sslonly", "app", "", AuthenticationFailed, "no encryption", "pg_hba.conf",
    ),
    "no-password": Refusal(
        "guarded", "app", "", AuthenticationFailed,
        "no password supplied", "fix the user name or password", password=None,
    ),
    "unknown-setting": Refusal(
        "postgres", "app", "?options=-c%20no_such_setting%3D1", ConnectionRejected,
        'unrecognized configuration parameter "no_such_setting"', "retrying cannot help",
    ),
    "url-requires-ssl": Refusal(
        "postgres", "app", "?sslmode=require", ConnectionRejected,
        "does not accept SSL", "sslmode",
    ),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    yield
    Store.close_all()


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    """A migrated database ``app`` behind a pg_hba.conf that refuses some logins.

    ``blocked`` is rejected outright, ``sslonly`` only without SSL (this build has no
    SSL, so it never gets in), ``guarded`` needs its password, ``crowded`` may open no
    connection until its limit is lifted; every other TCP login is trusted.
    """
    with EmbeddedPostgres() as pg:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
            conn.execute("CREATE ROLE blocked LOGIN")
            conn.execute("CREATE ROLE sslonly LOGIN")
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"CREATE ROLE guarded LOGIN PASSWORD '{SECRET}'")
            # Not a superuser: superusers ignore connection limits.
            conn.execute("CREATE ROLE crowded LOGIN CONNECTION LIMIT 0")
        migrate.upgrade(with_database(pg.url(), "app"))
        with psycopg.connect(with_database(pg.url(), "app"), autocommit=True) as conn:
            for grant in ("TABLES", "SEQUENCES"):
                conn.execute(f"GRANT ALL ON ALL {grant} IN SCHEMA public TO crowded")
        (pg.datadir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all blocked 127.0.0.1/32 reject\n"
            "hostnossl all sslonly 127.0.0.1/32 reject\n"
            "host all guarded 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        wait_until(lambda: _refused(pg, "blocked"), timeout=10, message="pg_hba.conf reloaded")
        yield pg


def _refused(pg: EmbeddedPostgres, user: str) -> bool:
    try:
        psycopg.connect(f"postgresql://{user}@127.0.0.1:{pg.port}/app").close()
    except psycopg.OperationalError:
        return True
    return False


def _full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("case", REFUSALS)
def test_delay_raises_the_named_error_at_once_without_the_password(
    server: EmbeddedPostgres, case: str
) -> None:
    refusal = REFUSALS[case]
    producer = Celery("producer", broker=refusal.url(server.port), set_as_current=False)
    producer.conf.result_backend = None
    try:
        # Not retried: kombu retries only its connection errors, and would end on
        # DatabaseUnavailable after its attempts.
        with pytest.raises(ConnectionRejected) as caught:
            producer.send_task("proc.record", kwargs={"label": "never"})
    finally:
        producer.close()
    error = caught.value
    assert type(error) is refusal.error, _full_text(error)
    assert not isinstance(error, DatabaseUnavailable)
    assert refusal.server_says in str(error) and refusal.fix in str(error), str(error)
    assert error.sqlstate is None or len(error.sqlstate) == 5
    assert SECRET not in _full_text(error)


@pytest.mark.worker
@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSALS)
def test_celery_worker_exits_non_zero_and_the_cli_exits_2_naming_the_refusal(
    server: EmbeddedPostgres, tmp_path: Path, case: str
) -> None:
    refusal = REFUSALS[case]
    app = write_app(tmp_path, refusal.url(server.port))
    worker = Worker(app, "doomed", ["--pool", "prefork", "-c", "1"])
    try:
        code = worker.wait(45)
        log = worker.log()
        assert code is not None, f"the worker kept running (retrying?):\n{log[-3000:]}"
    finally:
        worker.reap(grace=0)
    assert code != 0
    assert refusal.error.__name__ in log and refusal.server_says in log, log[-3000:]
    assert SECRET not in log

    cli = app.celery("pgqueue", "status")
    assert cli.returncode == 2, cli
    assert refusal.server_says in cli.stderr and refusal.fix in cli.stderr, cli.stderr
    assert SECRET not in cli.stdout + cli.stderr


def test_migrate_into_a_missing_database_exits_2_saying_to_create_it(
    server: EmbeddedPostgres,
) -> None:
    url = REFUSALS["missing-database"].url(server.port)
    done = subprocess.run(
        [sys.executable, "-m", "celery_pgqueue", "--url", url, "migrate"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done
    assert 'database "no_such_db" does not exist' in done.stderr, done.stderr
    assert "create the database" in done.stderr
    assert SECRET not in done.stdout + done.stderr


@pytest.mark.worker
@pytest.mark.slow
def test_too_many_connections_is_waited_out_and_the_worker_then_runs_tasks(
    server: EmbeddedPostgres, tmp_path: Path, workers: Workers
) -> None:
    """53300 is transient: ``.delay()`` raises the retryable error, a worker keeps trying."""
    url = f"pgqueue://crowded:{SECRET}@127.0.0.1:{server.port}/app"
    producer = Celery("producer", broker=url, set_as_current=False)
    producer.conf.result_backend = None
    try:
        with pytest.raises(KombuOperationalError, match="too many connections") as caught:
            producer.send_task("proc.record", kwargs={"label": "full"})
    finally:
        producer.close()
    # Kombu retried it as a connection error, then wrapped the last one.
    assert isinstance(caught.value.__cause__, DatabaseUnavailable), _full_text(caught.value)

    app = write_app(tmp_path, url)
    worker = workers.start(app, "patient", wait=False)
    wait_until(
        lambda: "too many connections" in worker.log(),
        timeout=45,
        message="the worker reports the full server and retries",
    )
    assert worker.alive(), worker.log()[-3000:]
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute("ALTER ROLE crowded CONNECTION LIMIT -1")
    try:
        wait_until(worker.ready, timeout=60, interval=0.2, message="worker connected")
        [spec] = task_specs(1, label="after the crowd")
        spec["id"] = str(uuid.uuid4())
        app.send([spec])
        app.close()
        db = Database(with_database(server.url(), "app"))
        wait_until(lambda: db.status(spec["id"]) == "completed", timeout=30)
    finally:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("ALTER ROLE crowded CONNECTION LIMIT 0")
    assert SECRET not in worker.log()


def test_a_result_backend_on_a_missing_database_raises_the_named_error_from_get(
    server: EmbeddedPostgres,
) -> None:
    url = REFUSALS["missing-database"].url(server.port)
    app = Celery("reader", broker="memory://", backend=url, set_as_current=False)
    try:
        with pytest.raises(DatabaseNotFound, match="create the database"):
            app.AsyncResult(str(uuid.uuid4())).get(timeout=30)
    finally:
        app.close()
