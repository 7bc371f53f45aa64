"""Reading task results: the stored state of several tasks in one round trip."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import UUID as PG_UUID

from celery_pgqueue.states import FINISHED, JobStatus, LogStatus
from celery_pgqueue.store.tables import job_logs, jobs


@dataclass(frozen=True, slots=True)
class StoredResult:
    """What a client reads back for one task."""

    id: UUID
    status: str
    result_json: str | None
    last_error_message: str | None
    finished_at: datetime | None
    queue_name: str
    payload: Any = None
    failure_log: str | None = None
    expired: bool = False
    """Still queued past its ``expires`` (not yet recorded as cancelled): reads REVOKED."""


def read(
    conn: sa.Connection,
    *,
    job_ids: Sequence[UUID],
    ready_only: bool = False,
    with_payload: bool = False,
    with_failure_log: bool = False,
) -> list[StoredResult]:
    """Several tasks' state in one round trip (``ready_only``: finished jobs only).

    ``result`` comes back as text so the caller decodes it with Celery's own JSON
    decoder (dates, UUIDs and bytes keep their types). ``with_failure_log`` adds the
    newest failed attempt's ``log_message`` (a bounded traceback when the option
    ``store_traceback`` is on).
    """
    if not job_ids:
        return []
    stmt = _read_statement(ready_only, with_payload, with_failure_log)
    rows = conn.execute(stmt, {"ids": list(job_ids)}).mappings()
    return [StoredResult(**row) for row in rows]


@functools.lru_cache(maxsize=8)
def _read_statement(ready_only: bool, with_payload: bool, with_failure_log: bool) -> sa.Select[Any]:
    finished_at = sa.case(
        (jobs.c.status == JobStatus.COMPLETED.value, jobs.c.completed_at),
        (jobs.c.status == JobStatus.FAILED.value, jobs.c.failed_at),
        (jobs.c.status == JobStatus.CANCELLED.value, jobs.c.updated_at),
        (  # expired, not yet recorded as cancelled
            sa.and_(jobs.c.status == JobStatus.QUEUED.value, jobs.c.expires_at <= sa.func.now()),
            jobs.c.expires_at,
        ),
        else_=None,
    )
    columns: list[Any] = [
        jobs.c.id,
        jobs.c.status,
        sa.cast(jobs.c.result, sa.Text).label("result_json"),
        jobs.c.last_error_message,
        finished_at.label("finished_at"),
        jobs.c.queue_name,
        sa.and_(
            jobs.c.status == JobStatus.QUEUED.value,
            jobs.c.expires_at.is_not(None),
            jobs.c.expires_at <= sa.func.now(),
        ).label("expired"),
    ]
    if with_payload:
        columns.append(jobs.c.payload)
    if with_failure_log:
        columns.append(
            sa.select(job_logs.c.log_message)
            .where(job_logs.c.job_id == jobs.c.id, job_logs.c.status == LogStatus.FAILED.value)
            .order_by(job_logs.c.attempt_number.desc(), job_logs.c.started_at.desc())
            .limit(1)
            .scalar_subquery()
            .label("failure_log")
        )
    ids = sa.bindparam("ids", type_=ARRAY(PG_UUID(as_uuid=True)))
    query = sa.select(*columns).where(jobs.c.id == sa.func.any(ids))
    if ready_only:
        query = query.where(
            sa.or_(
                jobs.c.status.in_([s.value for s in FINISHED]),
                sa.and_(
                    jobs.c.status == JobStatus.QUEUED.value,
                    jobs.c.expires_at <= sa.func.now(),
                ),
            )
        )
    return query
