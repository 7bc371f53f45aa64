"""Bad input, with real PostgreSQL and real workers: a named error with the fix, no partial row.

Publisher-side mistakes raise at ``.delay()`` and leave nothing behind; worker-side
mistakes (configuration, credentials, schema) stop ``celery worker`` at start-up with
the fix in its log instead of a reconnect loop; and a ``jobs`` row edited by hand
into something no worker can take is marked failed, named in the worker's log, while
the worker carries on with everything else. Secrets never appear in any of it.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery, group
from helpers import wait_until, with_database
from kombu.exceptions import EncodeError
from transport_process.procs import (
    App,
    Database,
    Worker,
    Workers,
    libpq_url,
    pgqueue_url,
    task_specs,
    write_app,
)

from celery_pgqueue import migrate
from celery_pgqueue.devserver import EmbeddedPostgres
from celery_pgqueue.errors import (
    AuthenticationFailed,
    InvalidQueueName,
    PayloadNotSerializable,
    PayloadTooLarge,
    SchemaMissing,
)
from celery_pgqueue.store import Store
from celery_pgqueue.store.schema import REQUIRED_REVISION
from celery_pgqueue.transaction import enqueue_in

pytestmark = [pytest.mark.worker]

MIGRATE_COMMANDS = ("celery-pgqueue migrate", "celery -A proj pgqueue migrate")


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    """Each test's database is dropped afterwards: let go of this process's pools."""
    yield
    Store.close_all()


@pytest.fixture
def producer(broker_url: str) -> Iterator[Celery]:
    """A Celery app in this process publishing to the test database, as a web app would."""
    app = Celery("producer", set_as_current=False)
    app.conf.update(broker_url=broker_url, result_backend=None, task_default_queue="celery")

    @app.task(name="proc.record", shared=False)
    def record(*args: Any, **kwargs: Any) -> None: ...

    yield app
    app.close()


def _worker_fails_to_start(app: App, *args: str, timeout: float = 45.0) -> tuple[int, str]:
    """Run ``celery worker`` expecting it to stop on its own; its exit code and log."""
    worker = Worker(app, "doomed", ["--pool", "prefork", "-c", "1", *args])
    try:
        code = worker.wait(timeout)
        log = worker.log()
        assert code is not None, f"the worker kept running (retrying?):\n{log[-3000:]}"
    finally:
        worker.reap(grace=0)
    return code, log


def _full_text(exc: BaseException) -> str:
    """An exception as a user would see it logged: the whole chain, with causes."""
    return "".join(traceback.format_exception(exc))


# -- publishing ------------------------------------------------------------------------


def test_an_oversized_task_in_a_group_leaves_no_row_of_any_member(
    producer: Celery, db: Database, database_url: str
) -> None:
    """A group is one batch: the oversized member is refused before anything is written."""
    producer.conf.broker_transport_options = {"max_payload_bytes": 1024}
    record = producer.tasks["proc.record"]
    members = [record.s(label="small"), record.s(label="x" * 5000), record.s(label="after")]

    with pytest.raises(PayloadTooLarge) as caught:
        group(members).apply_async()
    text = str(caught.value)
    assert "'proc.record'" in text and "1,024-byte limit" in text and "max_payload_bytes" in text
    assert db.task_counts() == {}

    engine = Store.for_url(pgqueue_url(database_url)).engine
    with pytest.raises(PayloadTooLarge), engine.begin() as conn, enqueue_in(conn):
        record.delay(label="in the same transaction")
        group(members).apply_async()
    assert db.task_counts() == {}, "inside enqueue_in the caller's whole transaction rolls back"


def test_arguments_that_are_not_json_are_refused_by_kombu_and_leave_no_row(
    producer: Celery, db: Database
) -> None:
    with pytest.raises(EncodeError, match="Object of type object is not JSON serializable"):
        producer.tasks["proc.record"].delay(when=object())
    assert db.task_counts() == {}


def test_headers_that_are_not_json_raise_payload_not_serializable_at_once(
    producer: Celery, db: Database
) -> None:
    started = time.monotonic()
    with pytest.raises(PayloadNotSerializable) as caught:
        producer.tasks["proc.record"].apply_async(headers={"when": object()})
    assert time.monotonic() - started < 2.0, "not retried as if the broker were down"
    assert "pass ids and plain values" in str(caught.value)
    assert db.task_counts() == {}


ODD_QUEUES = [
    "it's; DROP TABLE jobs; --",
    "\"; DELETE FROM job_queues WHERE ''='",
    "Robert'); DROP TABLE job_logs;--",
    "%s %(name)s $1 \\N \\\\ ?",
    "unicode ✓ очередь 队列 🚀",
    "é" * 100,  # 100 characters, 200 bytes: the limit counts characters
]


def test_queue_names_with_quotes_semicolons_and_unicode_round_trip_through_a_worker(
    tmp_path: Path, broker_url: str, db: Database, workers: Workers, producer: Celery
) -> None:
    """Queue names are values, never SQL: odd ones are stored as given and consumed."""
    app = write_app(tmp_path, broker_url)
    worker = workers.start(app, "odd", "-Q", ",".join(ODD_QUEUES))
    specs = {queue: task_specs(1, label=f"q{n}")[0] for n, queue in enumerate(ODD_QUEUES)}
    for queue, spec in specs.items():
        producer.send_task("proc.record", kwargs=spec["kwargs"], task_id=spec["id"], queue=queue)
    db.wait_for_counts({"completed": len(specs)}, timeout=60, workers=[worker])

    for queue, spec in specs.items():
        job = db.job(spec["id"])
        assert job is not None and job["queue_name"] == queue
        assert [e.event for e in app.record.events(spec["id"])] == ["run"]
    names = {name for (name,) in db.rows("SELECT name FROM job_queues")}
    assert set(ODD_QUEUES) <= names
    tables = db.rows(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        " AND tablename IN ('jobs', 'job_queues', 'job_logs')"
    )
    assert tables == [(3,)]


@pytest.mark.parametrize("queue", ["q" * 101, "nul\x00inside"], ids=["101-characters", "nul"])
def test_queue_names_that_do_not_fit_are_refused_before_anything_is_written(
    producer: Celery, db: Database, queue: str
) -> None:
    with pytest.raises(InvalidQueueName, match="use 1 to 100 characters without NUL"):
        producer.tasks["proc.record"].apply_async(queue=queue)
    assert db.task_counts() == {}
    assert db.rows("SELECT name FROM job_queues WHERE name <> 'celery'") == []


# -- worker configuration --------------------------------------------------------------


WORKER_CONFIG_ERRORS: dict[str, tuple[dict[str, Any], str, str]] = {
    # id: (config override, broker URL suffix, expected text in the log)
    "mistyped-option": (
        {"broker_transport_options": {"lease_second": 3}},
        "",
        "unknown pgqueue option 'lease_second'; did you mean 'lease_seconds'?",
    ),
    "option-of-the-wrong-type": (
        {"broker_transport_options": {"lease_seconds": "soon"}},
        "",
        "pgqueue option 'lease_seconds' expects float, got 'soon'",
    ),
    "mistyped-url-parameter": (
        {},
        "?sslmod=require",
        "unknown connection parameter 'sslmod'",
    ),
}


@pytest.mark.parametrize(
    ("config", "suffix", "expected"),
    list(WORKER_CONFIG_ERRORS.values()),
    ids=list(WORKER_CONFIG_ERRORS),
)
def test_celery_worker_with_a_configuration_mistake_exits_naming_it(
    tmp_path: Path, broker_url: str, config: dict[str, Any], suffix: str, expected: str
) -> None:
    app = write_app(tmp_path, broker_url + suffix, **config)
    code, log = _worker_fails_to_start(app)
    assert code != 0
    assert "ConfigurationError" in log and expected in log, log[-3000:]


@pytest.mark.slow
def test_celery_worker_refuses_a_queue_name_over_100_characters(
    tmp_path: Path, broker_url: str
) -> None:
    app = write_app(tmp_path, broker_url)
    code, log = _worker_fails_to_start(app, "-Q", "q" * 101)
    assert code != 0
    assert "InvalidQueueName" in log and "1 to 100 characters" in log, log[-3000:]


# -- credentials -----------------------------------------------------------------------

RIGHT_PASSWORD = "right-Pass-8c1d"
WRONG_PASSWORD = "Wr0ng-Secret-5e7a"


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """A private server that checks passwords (scram-sha-256 over TCP), migrated.

    Yields the URL of its migrated database, without a password.
    """
    with EmbeddedPostgres() as server:
        admin = server.url()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"ALTER ROLE postgres PASSWORD '{RIGHT_PASSWORD}'")
            conn.execute("CREATE DATABASE app")
        app_url = with_database(admin, "app")
        migrate.upgrade(app_url)
        (server.datadir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        wait_until(lambda: _refused(app_url), timeout=10, message="the server asks for a password")
        yield app_url


def _refused(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        return "password" in str(exc)
    return False


def _with_password(url: str, password: str) -> str:
    return pgqueue_url(url, password=password)


@pytest.mark.slow
def test_a_wrong_password_fails_delay_and_the_worker_at_once_without_showing_it(
    tmp_path: Path, password_server: str
) -> None:
    app_url = password_server
    wrong = _with_password(app_url, WRONG_PASSWORD)

    producer = Celery("producer", broker=wrong, set_as_current=False)
    producer.conf.result_backend = None
    try:
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed) as caught:
            producer.send_task("proc.record", kwargs={"label": "never"})
        refused_after = time.monotonic() - started
    finally:
        producer.close()
    text = _full_text(caught.value)
    assert "password authentication failed" in str(caught.value)
    assert "fix the user name or password in the URL" in str(caught.value)
    assert WRONG_PASSWORD not in text
    assert refused_after < 5.0, "a refused login is not retried as if the server were down"

    app = write_app(tmp_path, wrong)
    code, log = _worker_fails_to_start(app)
    assert code != 0
    assert "AuthenticationFailed" in log and "password authentication failed" in log, log[-3000:]
    assert WRONG_PASSWORD not in log

    cli = app.celery("pgqueue", "status")
    assert cli.returncode == 2, cli
    assert "authentication failed" in cli.stderr
    assert WRONG_PASSWORD not in cli.stdout + cli.stderr

    with psycopg.connect(libpq_url(_with_password(app_url, RIGHT_PASSWORD))) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


@pytest.mark.slow
def test_the_right_password_works_end_to_end_and_never_shows_in_the_log(
    tmp_path: Path, password_server: str, workers: Workers
) -> None:
    app_url = password_server
    right = _with_password(app_url, RIGHT_PASSWORD)
    app = write_app(tmp_path, right, result_backend=right)
    worker = workers.start(app, "right", "--loglevel", "DEBUG")
    [spec] = task_specs(1, label="with-a-password")
    try:
        app.send([spec])
    finally:
        app.close()
    db = Database(_with_password(app_url, RIGHT_PASSWORD))
    wait_until(lambda: db.status(spec["id"]) == "completed", timeout=30)
    worker.reap()
    log = worker.log()
    assert "pgqueue://postgres:**@" in log
    assert RIGHT_PASSWORD not in log


def test_no_password_leaks_from_the_cli_with_a_wrong_password(
    tmp_path: Path, password_server: str
) -> None:
    """``celery-pgqueue --url`` (no Celery app) says authentication failed, exit 2."""
    app_url = password_server
    wrong = _with_password(app_url, WRONG_PASSWORD)
    done = subprocess.run(
        [sys.executable, "-m", "celery_pgqueue", "--url", wrong, "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done
    assert "authentication failed" in done.stderr
    assert WRONG_PASSWORD not in done.stdout + done.stderr


# -- schema ----------------------------------------------------------------------------


@pytest.fixture(params=["missing", "outdated"])
def unmigrated_url(request: pytest.FixtureRequest) -> tuple[str, str]:
    """A database without the tables, or with them at revision 0002; and the wording."""
    if request.param == "missing":
        return request.getfixturevalue("empty_database_url"), "tables are missing"
    url = request.getfixturevalue("database_url")
    migrate.downgrade(url, "0002")
    return url, f"at revision 0002, this version needs {REQUIRED_REVISION}"


def test_publishing_to_a_database_without_the_current_tables_names_the_migrate_command(
    unmigrated_url: tuple[str, str],
) -> None:
    url, wording = unmigrated_url
    producer = Celery("producer", broker=pgqueue_url(url), set_as_current=False)
    producer.conf.result_backend = None
    try:
        with pytest.raises(SchemaMissing) as caught:
            producer.send_task("proc.record", kwargs={"label": "never"})
    finally:
        producer.close()
    text = str(caught.value)
    assert wording in text and all(command in text for command in MIGRATE_COMMANDS), text
    with psycopg.connect(url) as conn:
        jobs = conn.execute("SELECT to_regclass('jobs') IS NOT NULL").fetchone()
        if jobs == (True,):
            assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


@pytest.mark.slow
def test_a_worker_on_a_database_without_the_current_tables_stops_naming_the_command(
    tmp_path: Path, unmigrated_url: tuple[str, str]
) -> None:
    url, wording = unmigrated_url
    app = write_app(tmp_path, pgqueue_url(url))
    code, log = _worker_fails_to_start(app)
    assert code != 0
    assert "SchemaMissing" in log and wording in log, log[-3000:]
    assert all(command in log for command in MIGRATE_COMMANDS), log[-3000:]


# -- rows edited by hand ---------------------------------------------------------------


def _message(task: str, task_id: str, **changes: Any) -> dict[str, Any]:
    """A stored payload in the shape the transport writes, with ``changes`` applied."""
    document: dict[str, Any] = {
        "body": [[], {"label": "hand-made"}, {}],
        "body_encoding": "json",
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {"task": task, "id": task_id},
        "properties": {"priority": None},
        "exchange": "",
        "routing_key": "celery",
    }
    document.update(changes)
    return document


def _base64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# id: (payload given the job id (None: SQL NULL), how the row's error reads)
BROKEN_ROWS: dict[str, tuple[Any, str]] = {
    "payload-is-a-string": (lambda i: "garbage", "the payload is a JSON string, not an object"),
    "payload-is-null": (lambda i: None, "the payload is a JSON null, not an object"),
    "headers-not-an-object": (
        lambda i: _message("proc.record", i, headers="proc.record"),
        "payload 'headers' is a JSON string, not an object",
    ),
    "no-content-type": (
        lambda i: _message("proc.record", i, **{"content-type": None}),
        "the payload has no 'content-type'",
    ),
    "body-not-base64": (
        lambda i: _message("proc.record", i, body="***", body_encoding="base64"),
        "payload 'body' is not valid base64",
    ),
    "json-body-not-json": (
        lambda i: _message("proc.record", i, body=_base64("[[], {"), body_encoding="base64"),
        "payload 'body' is not JSON although its content-type says so",
    ),
    "unknown-body-encoding": (
        lambda i: _message("proc.record", i, body_encoding="rot13"),
        "payload 'body_encoding' must be one of",
    ),
    "retries-not-a-number": (
        lambda i: _message(
            "proc.record", i, headers={"task": "proc.record", "id": i, "retries": "x"}
        ),
        "payload header 'retries' is not an integer",
    ),
    "body-celery-cannot-unpack": (
        lambda i: _message("proc.record", i, body="just text"),
        "InvalidPayload: ValueError",
    ),
    "unregistered-task": (
        lambda i: _message("nobody.has.this", i),
        "Rejected: the worker rejected the message",
    ),
}


@pytest.mark.slow
def test_rows_edited_into_nonsense_are_failed_and_logged_while_the_worker_carries_on(
    tmp_path: Path,
    broker_url: str,
    db: Database,
    workers: Workers,
    producer: Celery,
    measure,
) -> None:
    lease, maintenance = 2.0, 0.5
    app = write_app(
        tmp_path,
        broker_url,
        transport_options={"lease_seconds": lease, "maintenance_interval": maintenance},
    )
    worker = workers.start(app, "sturdy")
    before = task_specs(3, label="before")
    app.send(before)

    broken: dict[str, str] = {}
    for name, (payload, _) in BROKEN_ROWS.items():
        job_id = str(uuid.uuid4())
        document = payload(job_id)
        db.rows(
            "INSERT INTO jobs (id, queue_name, priority, payload)"
            " VALUES (%s, 'celery', 0, %s::jsonb) RETURNING id",
            uuid.UUID(job_id),
            None if document is None else json.dumps(document),
        )
        broken[name] = job_id

    # Two valid messages whose rows say "running" without any lease: no worker holds
    # them and no heartbeat will ever extend them. Published to a queue nobody reads,
    # then moved by hand.
    unleased = task_specs(2, label="unleased")
    for spec in unleased:
        producer.send_task("proc.record", kwargs=spec["kwargs"], task_id=spec["id"], queue="parked")
    db.rows(
        "UPDATE jobs SET queue_name = 'celery', status = 'running', attempt_count = 1,"
        " lease_owner = 'ghost', lease_expires_at = NULL,"
        " acked_at = CASE WHEN id = %s THEN now() END"
        " WHERE id = ANY(%s::uuid[]) RETURNING id",
        uuid.UUID(unleased[1]["id"]),
        [s["id"] for s in unleased],
    )
    after = task_specs(3, label="after")
    app.send(after)
    app.close()

    good = [s["id"] for s in before + after]
    expected = {
        **dict.fromkeys([*good, unleased[0]["id"]], "completed"),
        **dict.fromkeys([*broken.values(), unleased[1]["id"]], "failed"),
    }

    def settled() -> bool:
        statuses = db.rows(
            "SELECT id::text, status FROM jobs WHERE id = ANY(%s::uuid[])", list(expected)
        )
        return dict(statuses) == expected

    try:
        wait_until(settled, timeout=lease + maintenance + 30, message="every row settled")
    except AssertionError:
        raise AssertionError(f"{db.stuck()}\n{worker.log()[-3000:]}") from None
    # Long enough for rescue to have taken anything back, had anything been left running.
    time.sleep(2 * (lease + maintenance))
    assert worker.alive(), worker.log()[-3000:]
    log = worker.log()

    for name, job_id in broken.items():
        job = db.job(job_id)
        assert job is not None
        assert job["status"] == "failed", (name, job)
        assert job["attempt_count"] == 1, f"{name}: claimed again"
        assert BROKEN_ROWS[name][1] in (job["last_error_message"] or ""), (name, job)
        assert [s for _, s, _ in db.logs(job_id)] == ["failed"], name
        if job["last_error_message"].startswith("InvalidPayload"):
            assert f"job {job_id}" in log, name
            assert f"pgqueue retry {job_id}" in log, name
    assert "garbage" not in log, "payloads are never logged"
    for task_id in good:
        assert [e.event for e in app.record.events(task_id)] == ["run"], task_id

    requeued, lost = unleased[0]["id"], unleased[1]["id"]
    assert [e.event for e in app.record.events(requeued)] == ["run"]
    assert (db.status(requeued), (db.job(requeued) or {})["attempt_count"]) == ("completed", 2)
    assert app.record.events(lost) == [], "acked before it lost its lease: never run again"
    assert "worker lost" in ((db.job(lost) or {})["last_error_message"] or "").lower()
    measure(
        f"{len(broken)} rows edited into nonsense: all failed with the reason, each once; "
        f"2 running rows without a lease: rescued (requeued and run / failed 'worker lost'); "
        f"{len(good)} good tasks ran once; the worker never stopped"
    )
