"""NOTIFY channels: any schema name fits them, and only the tier's roles can find them.

PostgreSQL identifiers, channel names included, are at most 63 bytes: ``pg_notify``
refuses a longer channel and ``LISTEN`` silently truncates one. And any role that may
connect may LISTEN on any channel, so a result riding in a notification is readable
by whoever can name the channel: the names must not be guessable from outside.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery
from helpers import running_worker
from psycopg import sql
from transport_process.procs import Workers, pgqueue_url, write_app

from celery_pgqueue.store import Store
from celery_pgqueue.store.notify import ResultListener

from .roles import as_role, login_role

pytestmark = pytest.mark.worker

LONGEST_SCHEMA = "tier_" + "x" * 58  # 63 bytes: PostgreSQL's longest identifier
LONGEST_QUEUE = "queue " + "ü" * 94  # 100 characters (194 bytes): the tier's longest

SECRET = "result-only-the-app-may-read-7d41"


@pytest.fixture
def app(database_url: str) -> Iterator[Celery]:
    url = pgqueue_url(database_url)
    app = Celery("channels", set_as_current=False)
    app.conf.update(
        broker_url=url,
        result_backend=url,
        broker_transport_options={"polling_interval": 0.5},
        worker_hijack_root_logger=False,
    )

    @app.task(name="channels.secret", shared=False)
    def secret() -> str:
        return SECRET

    yield app
    app.close()
    ResultListener.stop_all()
    Store.close_all()


def _channels_named_in(queries: list[tuple[Any]]) -> set[str]:
    """Channel names in the LISTEN statements a role can see in pg_stat_activity."""
    found = set()
    for (query,) in queries:
        for match in re.finditer(r'LISTEN\s+"?([^";\s]+)"?', query or "", re.IGNORECASE):
            found.add(match.group(1))
    return found


def test_a_role_with_connect_only_can_neither_hear_nor_read_a_result(
    app: Celery, database_url: str
) -> None:
    secret = app.tasks["channels.secret"]
    with login_role(database_url, "snoop") as (role, password):
        with running_worker(app):
            assert secret.delay().get(timeout=20) == SECRET  # every LISTEN session is up
            with psycopg.connect(as_role(database_url, role, password), autocommit=True) as snoop:
                seen = snoop.execute(
                    "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
                ).fetchall()
                # What an outsider would try: the names the package used to derive from
                # the schema, and any it can see other sessions LISTEN on.
                guesses = {"celery_pgqueue_public", "celery_pgqueue_public_results"}
                guesses |= _channels_named_in(seen)
                for channel in sorted(guesses):
                    snoop.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

                result = secret.delay()
                assert result.get(timeout=20) == SECRET
                heard = [(n.channel, n.payload) for n in snoop.notifies(timeout=1.0)]
                assert heard == [], "a role without table privileges heard the tier's NOTIFYs"

                for query in (
                    "SELECT result FROM jobs",
                    "SELECT payload FROM jobs",
                    "SELECT * FROM job_channels",
                ):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        snoop.execute(query)


def test_channel_names_fit_postgresql_whatever_the_schema(database_url: str) -> None:
    from celery_pgqueue.migrate import upgrade
    from celery_pgqueue.options import PgQueueOptions

    upgrade(database_url, schema=LONGEST_SCHEMA)
    store = Store(database_url, PgQueueOptions(schema=LONGEST_SCHEMA))
    try:
        store.check_schema()
        for channel in (store.channel, store.result_channel):
            assert len(channel.encode()) <= 63, channel
        assert store.channel != store.result_channel
    finally:
        store.dispose()


@pytest.mark.slow
def test_a_63_character_schema_works_end_to_end_with_a_real_worker(
    tmp_path: Path, database_url: str, workers: Workers
) -> None:
    url = pgqueue_url(database_url)
    migrated = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery_pgqueue.cli",
            "--url",
            database_url,
            "--schema",
            LONGEST_SCHEMA,
            "migrate",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    options = {"schema": LONGEST_SCHEMA, "polling_interval": 30.0}
    proc = write_app(
        tmp_path,
        url,
        transport_options=options,
        result_backend=url,
        result_backend_transport_options=options,
    )
    workers.start(proc, "long-schema", "-Q", f"celery,{LONGEST_QUEUE}", pool="threads")

    sender = Celery("long-schema-sender", set_as_current=False)
    sender.conf.update(proc.config)
    try:
        results = [
            sender.send_task("proc.record", kwargs={"label": str(n)}, queue=queue)
            for n, queue in enumerate(["celery", LONGEST_QUEUE, "celery", LONGEST_QUEUE])
        ]
        # polling_interval is 30 s: the worker is woken by the publish's NOTIFY (the
        # queue's name is its payload) and the waiter by the result's, on the channels
        # of a 63-byte schema.
        assert [r.get(timeout=15) for r in results] == [None] * 4
        assert [r.state for r in results] == ["SUCCESS"] * 4
    finally:
        sender.close()
        ResultListener.stop_all()
        Store.close_all()
    with psycopg.connect(database_url, autocommit=True) as conn:
        counts = conn.execute(
            sql.SQL("SELECT status, count(*) FROM {}.jobs GROUP BY status").format(
                sql.Identifier(LONGEST_SCHEMA)
            )
        ).fetchall()
    assert dict(counts).get("completed") == 4
