"""Plain-SQL reads and job factories for the store tests.

The store is the one layer that holds SQL, so its tests read outcomes back with plain
SQL (``Db``) rather than through the method under test.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from helpers import wait_until

from celery_pgqueue.store import NewJob
from celery_pgqueue.store.listener import Listener


class Db:
    """Plain SQL against the test database, one autocommitted statement per call."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(
            url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.NullPool
        )

    def execute(self, query: str, **params: Any) -> int:
        with self.engine.begin() as conn:
            return conn.execute(sa.text(query), params).rowcount

    def scalar(self, query: str, **params: Any) -> Any:
        with self.engine.begin() as conn:
            return conn.execute(sa.text(query), params).scalar()

    def all(self, query: str, **params: Any) -> list[sa.Row[Any]]:
        with self.engine.begin() as conn:
            return list(conn.execute(sa.text(query), params))

    def now(self) -> datetime:
        value: datetime = self.scalar("SELECT now()")
        return value

    def job(self, job_id: uuid.UUID) -> dict[str, Any]:
        """Every column of one jobs row (KeyError-free: fails the test if absent)."""
        rows = self.all("SELECT * FROM jobs WHERE id = :id", id=job_id)
        assert len(rows) == 1, f"job {job_id} not found"
        return dict(rows[0]._mapping)

    def logs(self, job_id: uuid.UUID) -> list[dict[str, Any]]:
        """A job's job_logs rows, by attempt."""
        rows = self.all(
            "SELECT * FROM job_logs WHERE job_id = :id ORDER BY attempt_number, started_at",
            id=job_id,
        )
        return [dict(r._mapping) for r in rows]

    def status(self, job_id: uuid.UUID) -> str:
        value: str = self.scalar("SELECT status FROM jobs WHERE id = :id", id=job_id)
        return value

    def backdate_job(self, job_id: uuid.UUID, column: str, seconds: float) -> None:
        """Move one timestamp of a job ``seconds`` into the past (no waiting in tests)."""
        assert column in {"updated_at", "lease_expires_at", "expires_at", "run_at", "created_at"}
        self.execute(
            f"UPDATE jobs SET {column} = now() - make_interval(secs => :s) WHERE id = :id",
            s=seconds,
            id=job_id,
        )


def new_job(queue: str = "default", **fields: Any) -> NewJob:
    """A NewJob with a fresh id and a small payload; ``fields`` override the rest."""
    fields.setdefault("payload", {"task": "tests.add", "args": [1, 2]})
    return NewJob(id=fields.pop("id", uuid.uuid4()), queue_name=queue, **fields)


def notifications_up_to_marker(listener: Listener, url: str, channel: str) -> list[str]:
    """Payloads ``listener`` got on ``channel`` before a marker NOTIFY sent now.

    PostgreSQL delivers notifications in commit order, so everything committed before
    the marker has arrived once the marker has: absence is proved without sleeping.
    """
    marker = f"marker-{uuid.uuid4()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, marker))
    got: list[str] = []

    def marker_arrived() -> bool:
        got.extend(payload for ch, payload in listener.wait(0.2) if ch == channel)
        return marker in got

    wait_until(marker_arrived, timeout=10, message=f"marker NOTIFY on {channel}")
    return got[: got.index(marker)]


def heard(listener: Listener, store: Any) -> list[str]:
    """:func:`notifications_up_to_marker` on the workers' channel of ``store``'s schema."""
    return notifications_up_to_marker(listener, store.url.libpq_url(), store.channel)
