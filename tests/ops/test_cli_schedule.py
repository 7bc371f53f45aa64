"""``pgqueue schedule list|enable|disable`` against entries a real scheduler wrote."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from celery import Celery
from celery.schedules import crontab

from celery_pgqueue.beat import Scheduler
from celery_pgqueue.store import Store
from ops.conftest import Result, pgqueue_url

Sql = Callable[..., list[tuple[object, ...]]]
Cli = Callable[..., Result]

SCHEDULE = {
    "every-minute": {"task": "proj.tasks.report", "schedule": crontab()},
    "hourly": {"task": "proj.tasks.cleanup", "schedule": timedelta(hours=1)},
}


@pytest.fixture
def synced(database_url: str) -> Iterator[Callable[..., None]]:
    """Write entries as a beat of app ``main`` would when it starts."""
    apps: list[Celery] = []

    def sync(main: str = "ops", schedule: dict[str, dict[str, object]] | None = None) -> None:
        app = Celery(main, set_as_current=False)
        app.conf.update(
            broker_url=pgqueue_url(database_url),
            result_backend=None,
            beat_schedule=schedule or SCHEDULE,
        )
        apps.append(app)
        Scheduler(app).close()

    yield sync
    for app in apps:
        app.close()
    Store.close_all()


def test_list_shows_each_entry_its_task_schedule_and_state(
    celery_cli: Cli, synced: Callable[..., None]
) -> None:
    synced()

    done = celery_cli("schedule", "list")

    assert done.code == 0, done
    lines = done.out.splitlines()
    assert any(line.startswith("NAME") and "NEXT RUN" in line for line in lines), done
    minute = next(line for line in lines if line.startswith("every-minute"))
    assert "proj.tasks.report" in minute and "<crontab: * * * * *" in minute and " yes " in minute
    assert "schedule 'ops': no beat leads it now" in done.out


@pytest.mark.slow
def test_disable_then_enable_flips_the_row_and_says_so(
    celery_cli: Cli, synced: Callable[..., None], sql: Sql
) -> None:
    synced()

    disabled = celery_cli("schedule", "disable", "hourly")
    assert disabled.code == 0, disabled
    assert disabled.out.strip() == "disabled hourly (schedule 'ops')"
    assert sql("SELECT enabled FROM job_schedules WHERE name = 'hourly'") == [(False,)]
    listed = celery_cli("schedule", "list", "--json")
    entries = {e["name"]: e for e in json.loads(listed.out)["entries"]}
    assert entries["hourly"]["enabled"] is False

    enabled = celery_cli("schedule", "enable", "hourly")
    assert enabled.code == 0, enabled
    assert sql("SELECT enabled FROM job_schedules WHERE name = 'hourly'") == [(True,)]


def test_an_unknown_entry_exits_3_naming_it(celery_cli: Cli, synced: Callable[..., None]) -> None:
    synced()

    done = celery_cli("schedule", "disable", "nightly")

    assert done.code == 3, done
    assert "no periodic task entry named 'nightly'" in done.err


def test_without_an_app_every_schedule_is_listed_and_an_ambiguous_name_needs_beat(
    standalone_cli: Cli, synced: Callable[..., None], database_url: str, sql: Sql
) -> None:
    synced("billing")
    synced("reports", {"hourly": {"task": "reports.tasks.hourly", "schedule": 3600}})

    listed = standalone_cli("--url", database_url, "schedule", "list")
    assert listed.code == 0, listed
    assert "BEAT" in listed.out.splitlines()[3]
    assert "schedule 'billing'" in listed.out and "schedule 'reports'" in listed.out

    ambiguous = standalone_cli("--url", database_url, "schedule", "disable", "hourly")
    assert ambiguous.code == 3, ambiguous
    assert "--beat NAME" in ambiguous.err

    chosen = standalone_cli(
        "--url", database_url, "schedule", "disable", "hourly", "--beat", "reports"
    )
    assert chosen.code == 0, chosen
    assert sql(
        "SELECT beat_name, enabled FROM job_schedules WHERE name = 'hourly' ORDER BY beat_name"
    ) == [("billing", True), ("reports", False)]
