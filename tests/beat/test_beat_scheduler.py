"""celery_pgqueue.beat.Scheduler driven tick by tick: entries, durability, leadership.

Each test builds real Celery apps on a fresh migrated database (the pgqueue broker
there too) and calls ``tick()`` as ``celery beat``'s loop does. Sent ticks are the
``jobs`` rows the broker wrote; the schedule's state is read from ``job_schedules``.
Several schedulers in one process stand for several beat processes: each has its own
holder id, as a process would.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from celery.schedules import crontab
from helpers import CELERY_5_7
from transport_process import pgbouncer
from transport_process.procs import Database, with_port

from beat.conftest import tick_until
from celery_pgqueue.beat import Scheduler
from celery_pgqueue.errors import ConfigurationError
from celery_pgqueue.store.schedule import Sent

MakeApp = Callable[..., Celery]
Build = Callable[[Celery], Scheduler]

HOURLY = {"hourly": {"task": "beat.hourly", "schedule": 3600.0}}
QUICK = {"quick": {"task": "beat.quick", "schedule": 0.3}}


def sent(db: Database, task: str) -> list[tuple[Any, ...]]:
    """Jobs the beat sent for ``task``: (id, created_at), oldest first."""
    return db.rows(
        "SELECT id, created_at FROM jobs WHERE payload->'headers'->>'task' = %s"
        " ORDER BY created_at",
        task,
    )


def gaps(times: list[Any]) -> list[float]:
    return [(b - a).total_seconds() for a, b in itertools.pairwise(times)]


def entry(db: Database, name: str, beat: str = "beattest") -> dict[str, Any]:
    rows = db.rows(
        "SELECT enabled, last_run_at, total_run_count, last_job_id, task, schedule,"
        " next_run_at FROM job_schedules WHERE beat_name = %s AND name = %s",
        beat,
        name,
    )
    assert rows, f"no job_schedules row for {beat}/{name}"
    keys = ("enabled", "last_run_at", "total_run_count", "last_job_id", "task", "schedule")
    return dict(zip((*keys, "next_run_at"), rows[0], strict=True))


def backdate(db: Database, name: str, seconds: float) -> None:
    """As if the entry last ran ``seconds`` ago (beat was down meanwhile)."""
    db.rows(
        "UPDATE job_schedules SET last_run_at = now() - make_interval(secs => %s),"
        " total_run_count = total_run_count + 1 WHERE name = %s RETURNING 1",
        seconds,
        name,
    )


# -- entries ---------------------------------------------------------------------------


def test_beat_schedule_entries_are_synced_into_job_schedules(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    app = make_app(
        {
            "every-second": {"task": "beat.quick", "schedule": 1.0},
            "at-four": {"task": "beat.cron", "schedule": crontab(minute=0, hour=4)},
        }
    )
    schedulers(app)

    names = [r[0] for r in db.rows("SELECT name FROM job_schedules ORDER BY name")]
    assert "every-second" in names and "at-four" in names
    every = entry(db, "every-second")
    assert every["task"] == "beat.quick"
    assert every["schedule"] == "<freq: 1.00 second>"
    assert every["enabled"] is True
    assert every["last_run_at"] is None and every["total_run_count"] == 0
    assert entry(db, "at-four")["schedule"].startswith("<crontab: 0 4 * * *")


def test_an_entry_removed_from_beat_schedule_leaves_the_table_and_the_others_keep_their_state(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    two = {**HOURLY, "daily": {"task": "beat.daily", "schedule": 86400.0}}
    schedulers(make_app(two)).close()
    backdate(db, "hourly", 10)
    db.rows("UPDATE job_schedules SET enabled = false WHERE name = 'hourly' RETURNING 1")
    before = entry(db, "hourly")

    schedulers(make_app(HOURLY))

    assert db.value("SELECT count(*) FROM job_schedules WHERE name = 'daily'") == 0
    after = entry(db, "hourly")
    assert (after["enabled"], after["last_run_at"], after["total_run_count"]) == (
        False,
        before["last_run_at"],
        before["total_run_count"],
    )


def test_two_apps_sharing_a_database_keep_separate_schedules_and_leaders(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    first = schedulers(make_app(QUICK, main="first"))
    second = schedulers(make_app({"slow": {"task": "beat.slow", "schedule": 0.3}}, main="second"))

    tick_until(lambda: sent(db, "beat.quick") and sent(db, "beat.slow"), first, second)

    assert first.is_leader and second.is_leader
    assert {r[0] for r in db.rows("SELECT beat_name FROM job_beat_leases")} == {"first", "second"}
    assert db.value("SELECT count(*) FROM job_schedules WHERE name = 'quick'") == 1


def test_pgqueue_beat_name_names_the_schedule(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    schedulers(make_app(HOURLY, pgqueue_beat_name="billing"))

    assert db.value("SELECT beat_name FROM job_schedules WHERE name = 'hourly'") == "billing"


@pytest.mark.parametrize("lease", [0, "soon", -1])
def test_a_lease_that_is_not_a_positive_number_of_seconds_is_refused(
    make_app: MakeApp, lease: object
) -> None:
    with pytest.raises(ConfigurationError, match="pgqueue_beat_lease_seconds"):
        Scheduler(make_app(HOURLY, pgqueue_beat_lease_seconds=lease))


def test_an_app_without_a_pgqueue_database_is_refused_with_what_to_set() -> None:
    app = Celery("nodb", set_as_current=False)
    app.conf.update(broker_url="memory://", result_backend=None, beat_schedule=HOURLY)

    with pytest.raises(ConfigurationError, match="broker_url nor result_backend"):
        Scheduler(app)


# -- sending ---------------------------------------------------------------------------


def test_a_due_tick_is_one_job_whose_id_the_entry_records(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    scheduler = schedulers(make_app(QUICK))

    tick_until(lambda: sent(db, "beat.quick"), scheduler)

    job_id, _created = sent(db, "beat.quick")[0]
    row = entry(db, "quick")
    assert row["last_job_id"] == job_id
    assert row["total_run_count"] == 1
    assert row["next_run_at"] > row["last_run_at"]
    headers = db.value("SELECT payload->'headers' FROM jobs WHERE id = %s", job_id)
    if CELERY_5_7:  # Celery's beat marks what it sends since 5.7, whatever the broker
        assert headers["celery_beat_task"] is True


def test_an_entry_ticks_at_its_interval_not_faster(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    scheduler = schedulers(make_app(QUICK))

    tick_until(lambda: len(sent(db, "beat.quick")) >= 4, scheduler)

    times = [created for _, created in sent(db, "beat.quick")]
    # Each job's created_at trails its tick by the send's own round trips: a tick
    # sent twice would show as two jobs a few milliseconds apart.
    assert min(gaps(times)) >= 0.3 / 2, gaps(times)
    assert entry(db, "quick")["total_run_count"] == len(times)


def test_a_restarted_beat_does_not_repeat_the_tick_it_sent(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    app = make_app(HOURLY)
    first = schedulers(app)
    db.rows(
        "UPDATE job_schedules SET last_run_at = now() - interval '2 hours' WHERE name = 'hourly'"
        " RETURNING 1"
    )
    tick_until(lambda: sent(db, "beat.hourly"), first)
    first.close()

    again = schedulers(make_app(HOURLY))
    tick_until(lambda: again.is_leader, again)
    for _ in range(20):
        again.tick()

    assert len(sent(db, "beat.hourly")) == 1


def test_a_restarted_beat_sends_a_tick_that_fell_due_while_it_was_down_once(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    """Celery's in-memory scheduler would wait a whole period from its start instead."""
    schedulers(make_app(HOURLY)).close()
    backdate(db, "hourly", 3600 * 3 + 5)  # down for three periods

    scheduler = schedulers(make_app(HOURLY))
    tick_until(lambda: sent(db, "beat.hourly"), scheduler)
    for _ in range(20):
        scheduler.tick()

    assert len(sent(db, "beat.hourly")) == 1


def test_a_crontab_entry_whose_time_passed_while_beat_was_down_is_sent_once(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    every_minute = {"cron": {"task": "beat.cron", "schedule": crontab()}}
    schedulers(make_app(every_minute)).close()
    backdate(db, "cron", 150)

    scheduler = schedulers(make_app(every_minute))
    tick_until(lambda: sent(db, "beat.cron"), scheduler)
    for _ in range(20):
        scheduler.tick()

    assert len(sent(db, "beat.cron")) == 1
    row = entry(db, "cron")
    # The next run is the next whole minute after this one.
    assert row["next_run_at"].second == 0
    assert timedelta(0) < row["next_run_at"] - row["last_run_at"] <= timedelta(minutes=1)


def test_a_disabled_entry_is_not_sent_and_enabling_it_by_sql_resumes_it_without_restart(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    scheduler = schedulers(make_app(QUICK))
    tick_until(lambda: sent(db, "beat.quick"), scheduler)

    db.rows("UPDATE job_schedules SET enabled = false WHERE name = 'quick' RETURNING 1")
    # The leader rereads the table at each renewal (every 0.2 x lease: 0.4 s here).
    tick_until(lambda: not scheduler._states["quick"].enabled, scheduler)
    count = len(sent(db, "beat.quick"))
    disabled_at = db.value("SELECT now()")
    for _ in range(40):
        scheduler.tick()
    assert db.value("SELECT count(*) FROM jobs WHERE created_at > %s", disabled_at) == 0

    db.rows("UPDATE job_schedules SET enabled = true WHERE name = 'quick' RETURNING 1")
    tick_until(lambda: len(sent(db, "beat.quick")) > count, scheduler)


# -- leadership and fencing --------------------------------------------------------------


def test_of_two_schedulers_one_leads_and_only_it_sends(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    one, two = schedulers(make_app(QUICK)), schedulers(make_app(QUICK))

    tick_until(lambda: len(sent(db, "beat.quick")) >= 3, one, two)

    assert [one.is_leader, two.is_leader].count(True) == 1
    leader = one if one.is_leader else two
    assert db.value("SELECT holder FROM job_beat_leases") == leader.holder
    times = [created for _, created in sent(db, "beat.quick")]
    # Each job's created_at trails its tick by the send's own round trips: a tick
    # sent twice would show as two jobs a few milliseconds apart.
    assert min(gaps(times)) >= 0.3 / 2, gaps(times)


def test_a_follower_takes_over_when_the_lease_lapses_with_a_higher_fence(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    leader, follower = schedulers(make_app(QUICK)), schedulers(make_app(QUICK))
    tick_until(lambda: leader.is_leader, leader)
    follower.tick()
    assert not follower.is_leader
    fence = db.value("SELECT fence FROM job_beat_leases")

    # The leader stops ticking (hung, or killed): its lease lapses after 0.7 x 2 s.
    tick_until(lambda: follower.is_leader, follower, timeout=5)

    assert db.value("SELECT fence FROM job_beat_leases") == fence + 1
    assert db.value("SELECT holder FROM job_beat_leases") == follower.holder


@pytest.mark.slow
def test_a_deposed_leader_that_wakes_up_sends_nothing_and_stands_by(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    old, new = schedulers(make_app(QUICK)), schedulers(make_app(QUICK))
    tick_until(lambda: sent(db, "beat.quick"), old)
    tick_until(lambda: new.is_leader, new, timeout=5)  # old was "paused" meanwhile
    tick_until(lambda: len(sent(db, "beat.quick")) >= 2, new)
    state = new._states["quick"]
    count = len(sent(db, "beat.quick"))

    # The old leader still believes it leads, and the entry is due by its reading.
    assert old.is_leader
    outcome = old._schedules.send(
        old._lease,
        old._settings.ttl,
        name="quick",
        expected_last_run_at=state.last_run_at,
        last_run_at=old.now(),
        next_run_at=None,
        job_id=None,
        publish=lambda conn: pytest.fail("a fenced send must not publish"),
    )
    assert outcome is Sent.FENCED
    old.tick()

    assert not old.is_leader
    assert len(sent(db, "beat.quick")) == count


def test_a_send_from_a_stale_reading_of_the_entry_changes_nothing(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    scheduler = schedulers(make_app(HOURLY))
    tick_until(lambda: scheduler.is_leader, scheduler)
    stale = scheduler._states["hourly"].last_run_at
    db.rows("UPDATE job_schedules SET last_run_at = now() WHERE name = 'hourly' RETURNING 1")

    outcome = scheduler._schedules.send(
        scheduler._lease,
        scheduler._settings.ttl,
        name="hourly",
        expected_last_run_at=stale,
        last_run_at=scheduler.now(),
        next_run_at=None,
        job_id=None,
        publish=lambda conn: pytest.fail("a stale send must not publish"),
    )

    assert outcome is Sent.STALE
    assert entry(db, "hourly")["total_run_count"] == 0


def test_a_tick_whose_publish_fails_is_rolled_back_with_its_job(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    scheduler = schedulers(make_app(HOURLY))
    tick_until(lambda: scheduler.is_leader, scheduler)
    state = scheduler._states["hourly"]

    def publish_then_fail(conn: Any) -> None:
        scheduler._publish(scheduler.schedule["hourly"], uuid.uuid4(), conn)
        raise RuntimeError("the process died here")

    with pytest.raises(RuntimeError):
        scheduler._schedules.send(
            scheduler._lease,
            scheduler._settings.ttl,
            name="hourly",
            expected_last_run_at=state.last_run_at,
            last_run_at=scheduler.now(),
            next_run_at=None,
            job_id=None,
            publish=publish_then_fail,
        )

    assert sent(db, "beat.hourly") == []
    assert entry(db, "hourly")["total_run_count"] == 0


def test_closing_the_leader_hands_over_at_once(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    app = make_app(HOURLY, pgqueue_beat_lease_seconds=60.0)
    leader, follower = schedulers(app), schedulers(make_app(HOURLY, pgqueue_beat_lease_seconds=60))
    tick_until(lambda: leader.is_leader, leader)
    follower.tick()
    assert not follower.is_leader

    leader.close()
    follower._attempt_at = 0.0  # its next look, without waiting 0.1 x 60 s for it

    follower.tick()
    assert follower.is_leader


def test_a_lapsed_lease_nobody_took_is_kept_by_its_holder_with_the_same_fence(
    make_app: MakeApp, schedulers: Build, db: Database
) -> None:
    scheduler = schedulers(make_app(QUICK))
    tick_until(lambda: sent(db, "beat.quick"), scheduler)
    fence = db.value("SELECT fence FROM job_beat_leases")
    db.rows("UPDATE job_beat_leases SET expires_at = now() - interval '1 minute' RETURNING 1")
    count = len(sent(db, "beat.quick"))

    tick_until(lambda: len(sent(db, "beat.quick")) > count, scheduler)

    assert scheduler.is_leader
    assert db.value("SELECT fence FROM job_beat_leases") == fence


@pytest.mark.skipif(
    pgbouncer.binary() is None,
    reason="pgbouncer is not installed (Debian: apt-get install pgbouncer)",
)
@pytest.mark.slow
def test_leadership_and_sends_work_through_pgbouncer_in_transaction_pooling(
    make_app: MakeApp, schedulers: Build, db: Database, database_url: str
) -> None:
    """Nothing rests on a server session: no advisory lock, no LISTEN, no prepared plan."""
    with pgbouncer.running(database_url) as (port, _log):
        pooled = with_port("pgqueue://" + database_url.split("://", 1)[1], "127.0.0.1", port)
        options = {"use_notify": False, "prepared_statements": False}

        def app() -> Celery:
            return make_app(QUICK, broker_url=pooled, broker_transport_options=options)

        one, two = schedulers(app()), schedulers(app())
        tick_until(lambda: len(sent(db, "beat.quick")) >= 3, one, two)
        assert [one.is_leader, two.is_leader].count(True) == 1
        follower = two if one.is_leader else one

        count = len(sent(db, "beat.quick"))
        tick_until(lambda: follower.is_leader, follower, timeout=5)  # the leader stalls
        tick_until(lambda: len(sent(db, "beat.quick")) > count, follower)

    times = [created for _, created in sent(db, "beat.quick")]
    assert min(gaps(times)) >= 0.3 / 2


def test_with_a_redis_broker_the_schedule_lives_in_the_result_backend_and_ticks_reach_redis(
    make_app: MakeApp, schedulers: Build, db: Database, broker_url: str
) -> None:
    """At most once there: the tick is committed, then published (see the README)."""
    redis = pytest.importorskip("redis").Redis(host="127.0.0.1", port=6379, socket_timeout=2)
    try:
        redis.ping()
    except Exception:
        pytest.skip("no Redis at 127.0.0.1:6379")
    queue = f"cpq-beat-test-{uuid.uuid4().hex[:8]}"
    app = make_app(
        QUICK,
        broker_url="redis://127.0.0.1:6379/0",
        result_backend=broker_url,
        task_default_queue=queue,
    )
    scheduler = schedulers(app)
    try:
        tick_until(lambda: redis.llen(queue) >= 2, scheduler)
        assert not scheduler._publishes_atomically()
        row = entry(db, "quick")
        assert row["total_run_count"] >= 2
        message = json.loads(redis.lindex(queue, 0))
        ids = {json.loads(m)["headers"]["id"] for m in redis.lrange(queue, 0, -1)}
        assert str(row["last_job_id"]) in ids
        assert message["headers"]["task"] == "beat.quick"
        assert sent(db, "beat.quick") == []  # no jobs row: the broker is Redis
    finally:
        redis.delete(queue)
