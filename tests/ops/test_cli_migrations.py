"""migrate / downgrade / current through the real command line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from celery_pgqueue.migrate import head_revision

from .conftest import Result, pgqueue_url

pytestmark = pytest.mark.slow


def tables(sql: Callable[..., list[tuple[Any, ...]]], schema: str = "public") -> set[str]:
    rows = sql("SELECT table_name FROM information_schema.tables WHERE table_schema = %s", schema)
    return {r[0] for r in rows}


@pytest.fixture
def empty_app(write_app: Callable[..., str], empty_database_url: str) -> str:
    return write_app(broker_url=pgqueue_url(empty_database_url))


@pytest.fixture
def empty_sql(empty_database_url: str) -> Any:
    import psycopg

    conn = psycopg.connect(empty_database_url, autocommit=True)

    def run(statement: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []

    yield run
    conn.close()


def test_migrate_creates_tables_and_views_then_is_a_no_op(
    celery_cli: Callable[..., Result], empty_app: str, empty_sql: Any
) -> None:
    first = celery_cli("migrate", app=empty_app)
    assert first.code == 0, first
    assert f"empty -> {head_revision()}" in first.out
    assert {"jobs", "job_queues", "job_logs", "job_queue_depth", "job_running"} <= tables(empty_sql)
    again = celery_cli("migrate", app=empty_app)
    assert again.code == 0, again
    assert "already at revision" in again.out


def test_current_prints_both_revisions_and_check_fails_until_migrated(
    celery_cli: Callable[..., Result], empty_app: str
) -> None:
    before = celery_cli("current", "--check", app=empty_app)
    assert before.code == 5, before
    assert "current: none" in before.out
    assert f"head:    {head_revision()}" in before.out
    assert "migrate" in before.err
    celery_cli("migrate", app=empty_app)
    after = celery_cli("current", "--check", app=empty_app)
    assert after.code == 0, after
    assert f"current: {head_revision()}" in after.out


def test_commands_on_an_unmigrated_database_name_the_migrate_command(
    celery_cli: Callable[..., Result], empty_app: str
) -> None:
    result = celery_cli("status", app=empty_app)
    assert result.code == 5, result
    assert "migrate" in result.err
    assert "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_migrate_sql_prints_ddl_for_the_schema_without_a_database(
    standalone_cli: Callable[..., Result],
) -> None:
    result = standalone_cli("migrate", "--sql", "--schema", "ops")
    assert result.code == 0, result
    assert 'CREATE SCHEMA IF NOT EXISTS "ops"' in result.out
    assert "CREATE VIEW job_queue_depth" in result.out
    assert "CREATE VIEW job_queue_throughput" in result.out
    assert "CREATE VIEW job_running" in result.out


def test_downgrade_asks_first_and_declining_changes_nothing(
    celery_cli: Callable[..., Result], app_module: str, sql: Any
) -> None:
    result = celery_cli("downgrade", stdin="n\n")
    assert result.code == 1, result
    assert "jobs" in tables(sql)


def test_downgrade_to_base_with_yes_drops_every_table(
    celery_cli: Callable[..., Result], app_module: str, sql: Any
) -> None:
    result = celery_cli("downgrade", "--yes")
    assert result.code == 0, result
    assert f"{head_revision()} -> base" in result.out
    assert not {"jobs", "job_queues", "job_logs", "job_queue_depth"} & tables(sql)


def test_downgrade_one_step_drops_the_views_and_migrate_restores_them(
    celery_cli: Callable[..., Result], app_module: str, sql: Any
) -> None:
    result = celery_cli("downgrade", "--revision", "0002", "--yes")
    assert result.code == 0, result
    assert "job_queue_depth" not in tables(sql)
    assert "jobs" in tables(sql)
    assert celery_cli("migrate").code == 0
    assert "job_queue_depth" in tables(sql)


def test_downgrade_to_an_unknown_revision_is_a_usage_error(
    celery_cli: Callable[..., Result], app_module: str
) -> None:
    result = celery_cli("downgrade", "--revision", "9999", "--yes")
    assert result.code == 2, result
    assert "Traceback" not in result.err


def test_migrate_into_a_schema_and_read_it_back(
    standalone_cli: Callable[..., Result], empty_database_url: str, empty_sql: Any
) -> None:
    url = pgqueue_url(empty_database_url)
    assert standalone_cli("migrate", "--url", url, "--schema", "ops").code == 0
    assert {"jobs", "job_queue_depth", "job_running"} <= tables(empty_sql, "ops")
    assert "jobs" not in tables(empty_sql, "public")
    empty_sql("INSERT INTO ops.job_queues (name) VALUES ('in_ops')")
    result = standalone_cli("--url", url, "--schema", "ops", "status", "--json")
    assert result.code == 0, result
    assert '"name": "in_ops"' in result.out
