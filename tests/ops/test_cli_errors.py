"""How the commands find their database, and how they fail: one line, a known code."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from .conftest import Jobs, Result, pgqueue_url

pytestmark = pytest.mark.slow

DOWN = "pgqueue://alice:s3cret-pw@127.0.0.1:1/nowhere"


def assert_one_line(result: Result) -> None:
    assert "Traceback" not in result.err, result
    assert len(result.err.strip().splitlines()) == 1, result


def test_standalone_needs_a_url(standalone_cli: Callable[..., Result]) -> None:
    result = standalone_cli("status")
    assert result.code == 2, result
    assert "--url" in result.err and "CELERY_PGQUEUE_URL" in result.err
    assert_one_line(result)


def test_standalone_reads_the_url_from_the_flag_or_the_environment(
    standalone_cli: Callable[..., Result], database_url: str, jobs: Jobs
) -> None:
    jobs.queued("default")
    url = pgqueue_url(database_url)
    for result in (
        standalone_cli("--url", url, "status", "--json"),
        standalone_cli("status", "--url", url, "--json"),
        standalone_cli("status", "--json", env={"CELERY_PGQUEUE_URL": url}),
    ):
        assert result.code == 0, result
        assert [q["name"] for q in json.loads(result.out)["queues"]] == ["default"]


def test_python_dash_m_is_the_standalone_command(database_url: str, jobs: Jobs) -> None:
    jobs.queued("default")
    done = subprocess.run(
        [sys.executable, "-m", "celery_pgqueue", "--url", database_url, "jobs", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 1


def test_url_overrides_the_apps_broker(
    celery_cli: Callable[..., Result], write_app: Callable[..., str]
) -> None:
    app = write_app(broker_url="pgqueue://postgres@127.0.0.1:5432/this_db_does_not_exist")
    result = celery_cli("--url", DOWN, "status", app=app)
    assert result.code == 4, result
    assert "127.0.0.1:1" in result.err


def test_an_app_without_postgres_is_a_usage_error(
    celery_cli: Callable[..., Result], write_app: Callable[..., str]
) -> None:
    app = write_app(broker_url="redis://localhost:6379/0", result_backend="redis://")
    result = celery_cli("status", app=app)
    assert result.code == 2, result
    assert "no PostgreSQL database" in result.err and "--url" in result.err
    assert_one_line(result)


def test_the_result_backend_is_used_when_the_broker_is_not_postgres(
    celery_cli: Callable[..., Result], write_app: Callable[..., str], database_url: str, jobs: Jobs
) -> None:
    jobs.queued("default")
    app = write_app(
        broker_url="redis://localhost:6379/0",
        broker_transport_options={"visibility_timeout": 10, "redis_only_option": 1},
        result_backend=pgqueue_url(database_url),
        result_backend_transport_options={"completed_retention": 60},
    )
    result = celery_cli("status", "--json", app=app)
    assert result.code == 0, result
    assert [q["name"] for q in json.loads(result.out)["queues"]] == ["default"]


def test_database_down_exits_4_without_leaking_the_password(
    celery_cli: Callable[..., Result], standalone_cli: Callable[..., Result]
) -> None:
    for result in (
        standalone_cli("--url", DOWN, "status"),
        standalone_cli("--url", DOWN, "migrate"),
        standalone_cli("--url", DOWN, "current"),
        celery_cli("--url", DOWN, "jobs"),
    ):
        assert result.code == 4, result
        assert "s3cret-pw" not in result.err + result.out
        assert "alice:**@" in result.err
        assert_one_line(result)


def test_a_missing_database_is_a_usage_error_saying_to_create_it(
    standalone_cli: Callable[..., Result], database_url: str
) -> None:
    """Retrying cannot create a database: exit 2 (fix the URL), not 4 (try again later)."""
    missing = pgqueue_url(database_url).rsplit("/", 1)[0] + "/cpq_no_such_database"
    result = standalone_cli("--url", missing, "status")
    assert result.code == 2, result
    assert "cpq_no_such_database" in result.err and "create the database" in result.err
    assert_one_line(result)


def test_an_unknown_transport_option_is_a_usage_error(
    celery_cli: Callable[..., Result], write_app: Callable[..., str], database_url: str
) -> None:
    app = write_app(broker_url=pgqueue_url(database_url), broker_transport_options={"pool_sise": 3})
    result = celery_cli("status", app=app)
    assert result.code == 2, result
    assert "did you mean 'pool_size'" in result.err
    assert_one_line(result)


def test_a_bad_url_is_a_usage_error(standalone_cli: Callable[..., Result]) -> None:
    result = standalone_cli("--url", "mysql://root:pw@localhost/db", "status")
    assert result.code == 2, result
    assert "pw@" not in result.err
    assert_one_line(result)


def test_help_lists_every_command(standalone_cli: Callable[..., Result]) -> None:
    result = standalone_cli("--help")
    assert result.code == 0, result
    for command in (
        "migrate",
        "downgrade",
        "current",
        "status",
        "pause",
        "resume",
        "set-priority",
        "jobs",
        "show",
        "cancel",
        "retry",
        "purge",
        "prune",
        "maintain",
    ):
        assert f"  {command} " in result.out, command
