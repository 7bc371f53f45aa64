"""Migrating: up, down, up again, twice, into another schema, offline SQL, and the
fail-fast check a worker runs at startup."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from alembic.script import ScriptDirectory

from celery_pgqueue import migrate
from celery_pgqueue.errors import SchemaMissing
from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.store import NewJob, Store
from celery_pgqueue.store import schema as schema_sql
from celery_pgqueue.store.tables import metadata

TIER_TABLES = set(metadata.tables)
MIGRATE_COMMAND = "celery-pgqueue migrate"


@pytest.fixture
def pg(empty_database_url: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def make_store(empty_database_url: str) -> Iterator[Any]:
    made: list[Store] = []

    def make(schema: str = "public") -> Store:
        store = Store(empty_database_url, PgQueueOptions(schema=schema))
        made.append(store)
        return store

    yield make
    for store in made:
        store.dispose()


def relations(pg: psycopg.Connection[tuple[Any, ...]], schema: str = "public") -> set[str]:
    """Tables and views in ``schema``."""
    rows = pg.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
    ).fetchall()
    return {name for (name,) in rows}


def shape(pg: psycopg.Connection[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    """Every column and index of the public schema, to compare two states."""
    columns = pg.execute(
        "SELECT table_name, column_name, data_type, is_nullable, column_default"
        " FROM information_schema.columns WHERE table_schema = 'public'"
    ).fetchall()
    indexes = pg.execute(
        "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'public'"
    ).fetchall()
    return set(columns) | set(indexes)


def test_upgrade_on_an_empty_database_creates_the_tier_and_records_head(
    empty_database_url: str, pg: psycopg.Connection[tuple[Any, ...]]
) -> None:
    assert migrate.current(empty_database_url) is None

    migrate.upgrade(empty_database_url)

    assert relations(pg) >= TIER_TABLES | {schema_sql.VERSION_TABLE}
    assert migrate.current(empty_database_url) == migrate.head_revision()


def test_downgrade_to_base_removes_every_tier_table(
    empty_database_url: str, pg: psycopg.Connection[tuple[Any, ...]]
) -> None:
    migrate.upgrade(empty_database_url)

    migrate.downgrade(empty_database_url, "base")

    assert relations(pg) <= {schema_sql.VERSION_TABLE}
    assert migrate.current(empty_database_url) is None


def test_upgrade_downgrade_upgrade_round_trips_to_the_same_schema(
    empty_database_url: str, pg: psycopg.Connection[tuple[Any, ...]]
) -> None:
    migrate.upgrade(empty_database_url)
    first = shape(pg)

    migrate.downgrade(empty_database_url, "base")
    migrate.upgrade(empty_database_url)

    assert shape(pg) == first
    assert migrate.current(empty_database_url) == migrate.head_revision()


def test_each_revision_downgrades_to_exactly_what_it_upgraded_from(
    empty_database_url: str, pg: psycopg.Connection[tuple[Any, ...]]
) -> None:
    script = ScriptDirectory(str(migrate.migrations_dir()))
    oldest_first = [r.revision for r in reversed(list(script.walk_revisions()))]
    migrate.upgrade(empty_database_url)
    shapes: dict[str, set[tuple[Any, ...]]] = {}
    for revision in reversed(oldest_first):
        assert migrate.current(empty_database_url) == revision
        shapes[revision] = shape(pg)
        migrate.downgrade(empty_database_url, "-1")
    assert shape(pg) <= {
        row for row in shapes[oldest_first[0]] if row[0] == schema_sql.VERSION_TABLE
    }

    for revision in oldest_first:
        migrate.upgrade(empty_database_url, revision)
        assert shape(pg) == shapes[revision], f"revision {revision} does not round-trip"


def test_upgrade_twice_changes_nothing(
    empty_database_url: str, pg: psycopg.Connection[tuple[Any, ...]]
) -> None:
    migrate.upgrade(empty_database_url)
    pg.execute("INSERT INTO job_queues (name) VALUES ('survives')")
    before = shape(pg)

    migrate.upgrade(empty_database_url)

    assert shape(pg) == before
    assert pg.execute("SELECT name FROM job_queues").fetchall() == [("survives",)]
    assert pg.execute("SELECT count(*) FROM celery_pgqueue_version").fetchone() == (1,)


def test_a_non_default_schema_holds_the_tables_and_a_store_works_there(
    empty_database_url: str, pg: psycopg.Connection[tuple[Any, ...]], make_store: Any
) -> None:
    migrate.upgrade(empty_database_url, schema="tier")

    assert relations(pg, "tier") >= TIER_TABLES | {schema_sql.VERSION_TABLE}
    assert relations(pg, "public") == set()
    assert migrate.current(empty_database_url, schema="tier") == migrate.head_revision()
    assert migrate.current(empty_database_url) is None

    store = make_store("tier")
    store.check_schema()
    job_id = uuid.uuid4()
    assert store.enqueue([NewJob(job_id, "q", {"n": 1})]) == 1
    [claimed] = store.claim("q", 1, "worker")
    assert claimed.id == job_id
    assert pg.execute("SELECT id, status FROM tier.jobs").fetchall() == [(job_id, "running")]
    assert pg.execute("SELECT count(*) FROM tier.job_logs").fetchone() == (1,)


def test_store_on_the_default_schema_does_not_see_another_schemas_tables(
    empty_database_url: str, make_store: Any
) -> None:
    migrate.upgrade(empty_database_url, schema="tier")

    with pytest.raises(SchemaMissing, match=MIGRATE_COMMAND):
        make_store("public").check_schema()


def test_two_schemas_migrate_and_downgrade_independently(
    empty_database_url: str, pg: psycopg.Connection[tuple[Any, ...]]
) -> None:
    migrate.upgrade(empty_database_url, schema="tier")
    migrate.upgrade(empty_database_url, schema="other_tier")

    migrate.downgrade(empty_database_url, "base", schema="other_tier")

    assert relations(pg, "tier") >= TIER_TABLES
    assert relations(pg, "other_tier") <= {schema_sql.VERSION_TABLE}


def test_upgrade_sql_prints_the_ddl_without_a_database() -> None:
    ddl = migrate.upgrade_sql()

    assert "CREATE TABLE jobs" in ddl
    assert "CREATE TABLE job_queues" in ddl
    assert "CREATE TABLE job_logs" in ddl
    assert "celery_pgqueue_version" in ddl
    assert "alembic_version" not in ddl


def test_upgrade_sql_for_another_schema_targets_it() -> None:
    ddl = migrate.upgrade_sql(schema="tier")

    assert 'CREATE SCHEMA IF NOT EXISTS "tier"' in ddl
    assert 'SET LOCAL search_path TO "tier"' in ddl
    assert "CREATE TABLE jobs" in ddl


def test_upgrade_sql_applied_by_hand_gives_a_schema_the_store_accepts(
    empty_database_url: str, pg: psycopg.Connection[tuple[Any, ...]], make_store: Any
) -> None:
    pg.execute(migrate.upgrade_sql().encode())

    assert relations(pg) >= TIER_TABLES
    make_store().check_schema()


# -- fail fast at startup ---------------------------------------------------------------


def test_check_schema_on_an_empty_database_names_the_migrate_command(make_store: Any) -> None:
    with pytest.raises(SchemaMissing, match=MIGRATE_COMMAND) as raised:
        make_store().check_schema()

    assert "missing" in str(raised.value)


def test_check_schema_on_an_older_revision_names_both_revisions_and_the_command(
    empty_database_url: str, pg: psycopg.Connection[tuple[Any, ...]], make_store: Any
) -> None:
    script = ScriptDirectory(str(migrate.migrations_dir()))
    previous = script.get_revision(migrate.head_revision()).down_revision
    if previous is not None:
        migrate.upgrade(empty_database_url, str(previous))
    else:  # a single revision: record an older one by hand
        migrate.upgrade(empty_database_url)
        pg.execute("UPDATE celery_pgqueue_version SET version_num = '0000'")
    older = migrate.current(empty_database_url)

    with pytest.raises(SchemaMissing, match=MIGRATE_COMMAND) as raised:
        make_store().check_schema()

    assert f"revision {older}" in str(raised.value)
    assert schema_sql.REQUIRED_REVISION in str(raised.value)


def test_store_calls_on_an_empty_database_raise_schema_missing(make_store: Any) -> None:
    store = make_store()

    with pytest.raises(SchemaMissing, match=MIGRATE_COMMAND):
        store.claim("default", 1, "worker")
    with pytest.raises(SchemaMissing, match=MIGRATE_COMMAND):
        store.enqueue([NewJob(uuid.uuid4(), "default", {})])
    with pytest.raises(SchemaMissing, match=MIGRATE_COMMAND):
        store.count_waiting("default")


def test_schema_missing_is_a_runtime_error_not_a_driver_error(make_store: Any) -> None:
    with pytest.raises(SchemaMissing) as raised:
        make_store().claim("default", 1, "worker")

    assert isinstance(raised.value, RuntimeError)
    assert not isinstance(raised.value, psycopg.Error)
    assert "UndefinedTable" in repr(raised.value.__cause__)
