"""The migrated schema is the seed's, column for column, and equals store/tables.py.

The seed (``queue-jobs-er.md``) is the contract with the rest of the platform: every
column it lists must exist with its type. ``tables.py`` is what the statements are
written against: the replayed migrations must produce exactly it, indexes and
constraints included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from psycopg import errors as pg_errors

from celery_pgqueue import migrate
from celery_pgqueue.store import schema as schema_sql
from celery_pgqueue.store.tables import metadata

TZ = ("timestamp with time zone", None)
INT = ("integer", None)

# The seed's columns: (information_schema data_type, character_maximum_length).
SEED_COLUMNS: dict[str, dict[str, tuple[str, int | None]]] = {
    "job_queues": {
        "name": ("character varying", 100),
        "default_priority": INT,
        "is_active": ("boolean", None),
        "created_at": TZ,
    },
    "jobs": {
        "id": ("uuid", None),
        "queue_name": ("character varying", 100),
        "status": ("character varying", 50),
        "priority": INT,
        "payload": ("jsonb", None),
        "attempt_count": INT,
        "max_attempts": INT,
        "run_at": TZ,
        "started_at": TZ,
        "completed_at": TZ,
        "failed_at": TZ,
        "last_error_message": ("character varying", 255),
        "created_at": TZ,
        "updated_at": TZ,
    },
    "job_logs": {
        "id": ("uuid", None),
        "job_id": ("uuid", None),
        "status": ("character varying", 50),
        "log_message": ("text", None),
        "attempt_number": INT,
        "started_at": TZ,
        "finished_at": TZ,
        "duration": ("interval", None),
    },
}
SEED_PRIMARY_KEYS = {"job_queues": ["name"], "jobs": ["id"], "job_logs": ["id"]}
JOB_STATUSES = ["queued", "running", "completed", "failed", "cancelled"]
LOG_STATUSES = ["attempting", "success", "retry", "failed"]


@pytest.fixture
def migrated_url(empty_database_url: str) -> str:
    migrate.upgrade(empty_database_url)
    return empty_database_url


@pytest.fixture
def pg(migrated_url: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        yield conn


def columns(
    pg: psycopg.Connection[tuple[Any, ...]], table: str, schema: str = "public"
) -> dict[str, tuple[str, int | None]]:
    rows = pg.execute(
        "SELECT column_name, data_type, character_maximum_length"
        " FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
        (schema, table),
    ).fetchall()
    return {name: (data_type, length) for name, data_type, length in rows}


def tables_in(pg: psycopg.Connection[tuple[Any, ...]], schema: str) -> set[str]:
    rows = pg.execute(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = %s AND table_type = 'BASE TABLE'",
        (schema,),
    ).fetchall()
    return {name for (name,) in rows}


@pytest.mark.parametrize("table", sorted(SEED_COLUMNS))
def test_upgrade_creates_every_seed_column_with_its_type(
    pg: psycopg.Connection[tuple[Any, ...]], table: str
) -> None:
    actual = columns(pg, table)

    missing = sorted(set(SEED_COLUMNS[table]) - set(actual))
    assert missing == []
    assert {name: actual[name] for name in SEED_COLUMNS[table]} == SEED_COLUMNS[table]


@pytest.mark.parametrize("table", sorted(SEED_PRIMARY_KEYS))
def test_each_seed_table_has_the_seed_primary_key(
    pg: psycopg.Connection[tuple[Any, ...]], table: str
) -> None:
    rows = pg.execute(
        "SELECT kcu.column_name FROM information_schema.table_constraints tc"
        " JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name)"
        " WHERE tc.table_schema = 'public' AND tc.table_name = %s"
        " AND tc.constraint_type = 'PRIMARY KEY' ORDER BY kcu.ordinal_position",
        (table,),
    ).fetchall()

    assert [name for (name,) in rows] == SEED_PRIMARY_KEYS[table]


def test_default_priority_defaults_to_100_and_queues_start_active(
    pg: psycopg.Connection[tuple[Any, ...]],
) -> None:
    pg.execute("INSERT INTO job_queues (name) VALUES ('q')")

    row = pg.execute("SELECT default_priority, is_active, created_at FROM job_queues").fetchone()

    assert row is not None
    assert row[:2] == (100, True)
    assert row[2] is not None


def test_jobs_reference_queues_and_logs_cascade_with_their_job(
    pg: psycopg.Connection[tuple[Any, ...]],
) -> None:
    rows = pg.execute(
        "SELECT kcu.table_name, kcu.column_name, ccu.table_name, ccu.column_name, rc.delete_rule"
        " FROM information_schema.referential_constraints rc"
        " JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name)"
        " JOIN information_schema.constraint_column_usage ccu"
        "   USING (constraint_schema, constraint_name)"
        " WHERE rc.constraint_schema = 'public'"
    ).fetchall()

    assert ("jobs", "queue_name", "job_queues", "name", "NO ACTION") in rows
    assert ("job_logs", "job_id", "jobs", "id", "CASCADE") in rows


def test_deleting_a_job_deletes_its_logs(pg: psycopg.Connection[tuple[Any, ...]]) -> None:
    pg.execute("INSERT INTO job_queues (name) VALUES ('q')")
    pg.execute(
        "INSERT INTO jobs (id, queue_name, priority)"
        " VALUES ('00000000-0000-0000-0000-000000000001', 'q', 1)"
    )
    pg.execute(
        "INSERT INTO job_logs (job_id, attempt_number)"
        " VALUES ('00000000-0000-0000-0000-000000000001', 1)"
    )

    pg.execute("DELETE FROM jobs")

    assert pg.execute("SELECT count(*) FROM job_logs").fetchone() == (0,)


def test_a_job_needs_an_existing_queue(pg: psycopg.Connection[tuple[Any, ...]]) -> None:
    with pytest.raises(pg_errors.ForeignKeyViolation):
        pg.execute("INSERT INTO jobs (id, queue_name, priority) VALUES (gen_random_uuid(), 'x', 1)")


def test_jobs_status_check_allows_exactly_the_seed_statuses(
    pg: psycopg.Connection[tuple[Any, ...]],
) -> None:
    pg.execute("INSERT INTO job_queues (name) VALUES ('q')")
    insert = (
        "INSERT INTO jobs (id, queue_name, priority, status) VALUES (gen_random_uuid(), 'q', 1, %s)"
    )
    for status in JOB_STATUSES:
        pg.execute(insert, (status,))
    for status in ["pending", "success", "retry", "QUEUED", ""]:
        with pytest.raises(pg_errors.CheckViolation):
            pg.execute(insert, (status,))

    assert pg.execute("SELECT count(*) FROM jobs").fetchone() == (len(JOB_STATUSES),)


def test_job_logs_status_check_allows_exactly_the_seed_statuses(
    pg: psycopg.Connection[tuple[Any, ...]],
) -> None:
    pg.execute("INSERT INTO job_queues (name) VALUES ('q')")
    job = "00000000-0000-0000-0000-000000000002"
    pg.execute("INSERT INTO jobs (id, queue_name, priority) VALUES (%s, 'q', 1)", (job,))
    insert = "INSERT INTO job_logs (job_id, attempt_number, status) VALUES (%s, 1, %s)"
    for status in LOG_STATUSES:
        pg.execute(insert, (job, status))
    for status in ["queued", "completed", "cancelled", "running", "SUCCESS"]:
        with pytest.raises(pg_errors.CheckViolation):
            pg.execute(insert, (job, status))

    assert pg.execute("SELECT count(*) FROM job_logs").fetchone() == (len(LOG_STATUSES),)


def test_version_table_is_our_own_not_alembic_version(
    pg: psycopg.Connection[tuple[Any, ...]],
) -> None:
    tables = tables_in(pg, "public")

    assert "celery_pgqueue_version" in tables
    assert "alembic_version" not in tables
    assert pg.execute("SELECT version_num FROM celery_pgqueue_version").fetchall() == [
        (migrate.head_revision(),)
    ]


def test_required_revision_is_the_migrations_head() -> None:
    assert schema_sql.REQUIRED_REVISION == migrate.head_revision()


# -- migrated schema == tables.py -----------------------------------------------------


def test_autogenerate_finds_no_difference_between_migrations_and_metadata(
    migrated_url: str,
) -> None:
    engine = sa.create_engine(
        migrated_url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.NullPool
    )

    def ours(obj: Any, name: str | None, kind: str, reflected: bool, compare_to: Any) -> bool:
        return not (kind == "table" and name == schema_sql.VERSION_TABLE)

    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "include_object": ours,
                },
            )
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()

    assert differences == []


CATALOG_COLUMNS = """
SELECT table_name, column_name, data_type, character_maximum_length, is_nullable,
       column_default
FROM information_schema.columns WHERE table_schema = %s
"""
CATALOG_INDEXES = """
SELECT tablename, indexname, replace(indexdef, %s, '')
FROM pg_indexes WHERE schemaname = %s
"""
CATALOG_CONSTRAINTS = """
SELECT rel.relname, con.conname, replace(pg_get_constraintdef(con.oid), %s, '')
FROM pg_constraint con
JOIN pg_class rel ON rel.oid = con.conrelid
JOIN pg_namespace ns ON ns.oid = rel.relnamespace
WHERE ns.nspname = %s
"""


def catalog(
    pg: psycopg.Connection[tuple[Any, ...]], schema: str, tables: set[str]
) -> dict[str, set[tuple[Any, ...]]]:
    """Columns, index definitions and constraint definitions of ``tables``, with the
    schema name taken out so two schemas compare equal."""
    prefix = schema + "."
    found = {
        "columns": pg.execute(CATALOG_COLUMNS, (schema,)).fetchall(),
        "indexes": pg.execute(CATALOG_INDEXES, (prefix, schema)).fetchall(),
        "constraints": pg.execute(CATALOG_CONSTRAINTS, (prefix, schema)).fetchall(),
    }
    return {kind: {row for row in rows if row[0] in tables} for kind, rows in found.items()}


def test_migrated_indexes_and_constraints_equal_the_metadatas(
    migrated_url: str, pg: psycopg.Connection[tuple[Any, ...]]
) -> None:
    # Autogenerate does not compare partial-index predicates or CHECK constraints, so
    # PostgreSQL itself renders both: metadata.create_all into a scratch schema, then
    # the catalogs of the two schemas must match.
    pg.execute("CREATE SCHEMA from_metadata")
    engine = sa.create_engine(
        migrated_url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.NullPool
    )
    try:
        with engine.begin() as conn:
            metadata.create_all(
                conn.execution_options(schema_translate_map={None: "from_metadata"})
            )
    finally:
        engine.dispose()
    tables = set(metadata.tables)

    assert tables_in(pg, "public") - {schema_sql.VERSION_TABLE} == tables
    migrated, declared = catalog(pg, "public", tables), catalog(pg, "from_metadata", tables)
    for kind in ("columns", "indexes", "constraints"):
        assert sorted(migrated[kind] - declared[kind]) == [], f"{kind} only in migrations"
        assert sorted(declared[kind] - migrated[kind]) == [], f"{kind} only in tables.py"
    # The comparison saw everything, not two empty sets.
    assert len(migrated["columns"]) == sum(len(t.columns) for t in metadata.tables.values())
    assert {row[1] for row in migrated["indexes"]} >= {
        "ix_jobs_ready",
        "ix_jobs_lease",
        "ix_jobs_finished",
    }
    assert {row[1] for row in migrated["constraints"]} >= {
        "ck_jobs_status",
        "ck_job_logs_status",
        "fk_jobs_queue_name",
        "fk_job_logs_job_id",
    }
