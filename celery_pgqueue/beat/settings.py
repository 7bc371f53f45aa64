"""Beat's settings: Celery configuration keys beside ``beat_schedule``.

``pgqueue_beat_name``
    The schedule's name in ``job_schedules`` (default: the app's main name, else
    ``default``): apps sharing one database keep separate schedules and leaders.
``pgqueue_beat_lease_seconds``
    How soon another beat sends after the leader dies (default 10 s). The lease row
    expires 0.7 of this after each renewal, followers look every 0.1 of it, the
    leader renews every 0.2 of it (which also bounds how late an enable/disable is
    seen).
"""

from __future__ import annotations

from typing import Any

from celery_pgqueue.errors import ConfigurationError
from celery_pgqueue.options import DatabaseURL, PgQueueOptions, app_database

NAME_SETTING = "pgqueue_beat_name"
LEASE_SETTING = "pgqueue_beat_lease_seconds"
DEFAULT_LEASE_SECONDS = 10.0

# Fractions of the lease: the row lapses after TTL, followers look every POLL, the
# leader renews every RENEW. TTL + POLL = 0.8 leaves a fifth of the lease for the new
# leader to read the table and send, so the next tick comes within the lease.
TTL = 0.7
POLL = 0.1
RENEW = 0.2


class BeatSettings:
    """Where the schedule lives and how long a lease lasts, from the Celery app."""

    def __init__(self, app: Any) -> None:
        found = app_database(app)
        if found is None:
            raise ConfigurationError(
                "celery_pgqueue.beat.Scheduler keeps the schedule in PostgreSQL, but "
                "neither broker_url nor result_backend is a pgqueue:// URL; set one of them"
            )
        self.url = DatabaseURL.parse(found[0])
        self.options = PgQueueOptions.parse(found[1])
        name = app.conf.get(NAME_SETTING) or app.main or "default"
        if not isinstance(name, str) or len(name) > 100:
            raise ConfigurationError(
                f"{NAME_SETTING} must be a string of at most 100 characters, got {name!r}"
            )
        self.beat_name = name
        lease = app.conf.get(LEASE_SETTING)
        try:
            self.lease_seconds = float(DEFAULT_LEASE_SECONDS if lease is None else lease)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"{LEASE_SETTING} expects seconds as a number, got {lease!r}"
            ) from None
        if not self.lease_seconds >= 0.5:
            raise ConfigurationError(
                f"{LEASE_SETTING} must be at least 0.5 seconds, got {self.lease_seconds}"
            )

    @property
    def ttl(self) -> float:
        return self.lease_seconds * TTL

    @property
    def poll(self) -> float:
        return self.lease_seconds * POLL

    @property
    def renew_every(self) -> float:
        return self.lease_seconds * RENEW
