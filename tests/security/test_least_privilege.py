"""The README's grants are enough, and nothing more is needed: migrate as one role, run
as another that owns nothing and runs no DDL.

The statements are read from the README's SQL blocks and run as written, with the
role and database names of this test. PUBLIC's default ``CONNECT`` on the database and
``USAGE`` on ``public`` are revoked first, so only the documented grants count.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from celery import Celery
from psycopg import sql
from transport_process.procs import Database, Workers, pgqueue_url, task_specs, write_app

from celery_pgqueue.store import Store
from celery_pgqueue.store.notify import ResultListener

from .roles import as_role, database_of, login_role

pytestmark = [pytest.mark.worker, pytest.mark.slow]

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
CLI = [str(Path(sys.executable).parent / "celery-pgqueue")]


def grants(marker: str) -> list[tuple[str, str]]:
    """``(who, statement)`` of the README's SQL block after ``<!-- marker``.

    ``who`` is ``admin`` or ``migrate``, from the ``-- as ...`` comment above it.
    """
    block = README[README.index(f"<!-- {marker}") :].split("```sql\n", 1)[1].split("```", 1)[0]
    found, who, pending = [], "admin", []
    for line in block.splitlines():
        if line.startswith("--"):
            who = "migrate" if "as app_migrate" in line else "admin"
            continue
        pending.append(line.strip())
        if line.rstrip().endswith(";"):
            found.append((who, " ".join(pending)))
            pending = []
    assert not pending and found
    return found


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--url", url, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_migrate_and_run_producer_worker_and_cli_with_only_the_documented_grants(
    tmp_path: Path, empty_database_url: str, workers: Workers
) -> None:
    admin_url = empty_database_url
    database = database_of(admin_url)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database))
        )
        admin.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")

    with (
        login_role(admin_url, "app_migrate") as (migrator, migrator_password),
        login_role(admin_url, "app_runtime") as (runtime, runtime_password),
    ):
        migrate_url = as_role(admin_url, migrator, migrator_password)
        runtime_url = as_role(admin_url, runtime, runtime_password)
        names = {"app_migrate": migrator, "app_runtime": runtime}

        def run(statements: list[tuple[str, str]]) -> None:
            for who, statement in statements:
                if statement.startswith("CREATE ROLE"):
                    # Made by login_role (with a password of the test's): the README's
                    # must ask for nothing more than LOGIN.
                    assert re.fullmatch(r"CREATE ROLE app_\w+ LOGIN PASSWORD '[^']*';", statement)
                    continue
                text = re.sub(r"\bapp_(migrate|runtime)\b", lambda m: names[m.group(0)], statement)
                text = text.replace("DATABASE app ", f'DATABASE "{database}" ')
                with psycopg.connect(
                    admin_url if who == "admin" else migrate_url, autocommit=True
                ) as conn:
                    conn.execute(text.encode())

        run(grants("grants-migrate"))
        migrated = cli(migrate_url, "migrate")
        assert migrated.returncode == 0, migrated.stderr
        run(grants("grants-runtime"))

        broker = pgqueue_url(runtime_url)
        app = write_app(
            tmp_path,
            broker,
            transport_options={"polling_interval": 0.5, "maintenance_interval": 0.5},
            result_backend=broker,
            result_backend_transport_options={"polling_interval": 0.5},
        )
        worker = workers.start(app, "runtime", pool="prefork", concurrency=2)
        specs = task_specs(4) + task_specs(1, queue="reports")
        app.publish(specs)  # a producer process, as the runtime role
        worker_reports = workers.start(app, "reports", "-Q", "reports", pool="solo")

        reader = Celery("reader", set_as_current=False)
        reader.conf.update(app.config)
        try:
            for spec in specs:
                result = reader.AsyncResult(spec["id"])
                assert result.get(timeout=30) is None and result.state == "SUCCESS"
        finally:
            reader.close()
            ResultListener.stop_all()
            Store.close_all()

        status = cli(broker, "status")
        assert status.returncode == 0, status.stderr
        assert "reports" in status.stdout and "celery" in status.stdout
        jobs = cli(broker, "jobs", "--status", "completed")
        assert jobs.returncode == 0, jobs.stderr
        assert all(spec["id"] in jobs.stdout for spec in specs), jobs.stdout
        shown = cli(broker, "show", specs[0]["id"])
        assert shown.returncode == 0, shown.stderr
        assert "completed" in shown.stdout

        for started in (worker, worker_reports):
            assert "permission denied" not in started.log().lower(), started.log()[-3000:]
        db = Database(admin_url)
        assert db.value("SELECT count(*) FROM pg_class WHERE relowner = %s::regrole", runtime) == 0
        assert db.value(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relname = 'jobs' AND c.relowner = %s::regrole",
            migrator,
        )
        workers.reap_all()


def test_a_runtime_role_cannot_change_the_schema(database_url: str) -> None:
    """The runtime grants give rows, not DDL: a compromised worker cannot alter the tier."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
    with login_role(database_url, "app_runtime") as (runtime, password):
        statements = [s for who, s in grants("grants-runtime") if not s.startswith("CREATE")]
        with psycopg.connect(database_url, autocommit=True) as admin:
            for statement in statements:
                text = statement.replace("app_runtime", runtime)
                text = text.replace("DATABASE app ", f'DATABASE "{database_of(database_url)}" ')
                admin.execute(text.encode())
        with psycopg.connect(as_role(database_url, runtime, password), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
            for ddl in (
                "ALTER TABLE jobs ADD COLUMN x int",
                "DROP TABLE job_logs",
                "TRUNCATE jobs",
                "CREATE TABLE public.extra (id int)",
                "UPDATE job_channels SET name = 'guessable'",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(ddl)
