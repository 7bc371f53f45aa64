"""The broker's per-task statements on ``jobs``: enqueue, claim, ack, finish, heartbeat.

Every write to a job a worker holds is fenced by ``attempt_count``: Celery's retry
re-publishes the same task id before the old delivery is acked, so a late write keyed
on the id alone could clobber the next attempt.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert

from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.storable import printable
from celery_pgqueue.store.expressions import (
    IS_QUEUED,
    IS_RUNNING,
    SECOND,
    close_attempts,
    fixed,
    held_pairs,
    held_params,
    is_held,
    notify_queues,
    status_literal,
)
from celery_pgqueue.store.hot import Call
from celery_pgqueue.store.listener import SCHEDULED_MARK
from celery_pgqueue.store.lookups import MAX_PRIORITY_LEVELS as MAX_PRIORITY_LEVELS
from celery_pgqueue.store.notify import INLINE_RESULT_BYTES
from celery_pgqueue.store.records import ClaimedJob, NewJob
from celery_pgqueue.store.tables import TZ, job_logs, job_queues, jobs

_INSERT_COLUMNS = (
    "id",
    "queue_name",
    "payload",
    "priority",
    "run_at",
    "max_attempts",
    "ttl",
    "delay",
)

_INSERT_TYPES: tuple[Any, ...] = (
    PG_UUID(as_uuid=True),
    sa.String,
    JSONB,
    sa.Integer,
    TZ,
    sa.Integer,
    sa.Float,
    sa.Float,
)

# Intervals (countdowns, TTLs) count from the statement, by the database's clock. Not
# now(): inside a caller's long transaction (enqueue_in) that is when it began, and a
# countdown would shrink by the transaction's age.
STATEMENT_TIME = sa.func.statement_timestamp()


def _one_row() -> sa.Subquery:
    """One job as scalar parameters: the common single publish.

    Arrays are sent in text form, and psycopg escapes every quote of every JSON
    payload inside a ``jsonb[]`` with a regular expression: for one row that was most
    of the client's CPU per publish. Scalars need no escaping.
    """
    return sa.select(
        *(
            sa.cast(sa.bindparam(f"p_{name}", type_=type_), type_).label(name)
            for name, type_ in zip(_INSERT_COLUMNS, _INSERT_TYPES, strict=True)
        )
    ).subquery("v")


@functools.cache
def _insert_statement(notify: bool, single: bool = False) -> sa.Executable:
    # unnest() of one array per column: the SQL text is the same for 2 or 10,000 jobs,
    # so the statement is prepared once and a batch costs one round trip.
    v: Any = (
        _one_row()
        if single
        else (
            sa.func.unnest(
                sa.bindparam("p_ids", type_=ARRAY(PG_UUID(as_uuid=True))),
                sa.bindparam("p_queues", type_=ARRAY(sa.String)),
                sa.bindparam("p_payloads", type_=ARRAY(JSONB)),
                sa.bindparam("p_priorities", type_=ARRAY(sa.Integer)),
                sa.bindparam("p_run_ats", type_=ARRAY(TZ)),
                sa.bindparam("p_max_attempts", type_=ARRAY(sa.Integer)),
                sa.bindparam("p_ttls", type_=ARRAY(sa.Float)),
                sa.bindparam("p_delays", type_=ARRAY(sa.Float)),
            )
            .table_valued(*_INSERT_COLUMNS)
            .render_derived(name="v", with_types=False)
        )
    )
    q = job_queues.alias("q")
    rows = sa.select(
        v.c.id,
        v.c.queue_name,
        v.c.payload,
        sa.func.coalesce(v.c.priority, q.c.default_priority, 100),
        sa.func.coalesce(STATEMENT_TIME + v.c.delay * SECOND, v.c.run_at, sa.func.now()),
        v.c.max_attempts,
        # The message's own expiration or its queue's x-message-ttl, whichever is
        # shorter (least() skips NULLs); neither: it waits until consumed.
        STATEMENT_TIME + sa.func.least(v.c.ttl, q.c.message_ttl) * SECOND,
    ).select_from(v.outerjoin(q, q.c.name == v.c.queue_name))
    base = pg_insert(jobs).from_select(
        ["id", "queue_name", "payload", "priority", "run_at", "max_attempts", "expires_at"], rows
    )
    stmt = base.on_conflict_do_update(
        index_elements=["id"],
        set_={
            "status": JobStatus.QUEUED.value,
            "queue_name": base.excluded.queue_name,
            "payload": base.excluded.payload,
            "priority": base.excluded.priority,
            "run_at": base.excluded.run_at,
            "max_attempts": sa.func.coalesce(base.excluded.max_attempts, jobs.c.max_attempts),
            "expires_at": base.excluded.expires_at,
            "lease_owner": None,
            "lease_expires_at": None,
            "acked_at": None,
            "updated_at": sa.func.now(),
        },
        where=jobs.c.status != status_literal(JobStatus.CANCELLED),
    ).returning(jobs.c.queue_name, jobs.c.run_at)
    inserted = stmt.cte("inserted")
    due = sa.select(inserted.c.queue_name).where(inserted.c.run_at <= STATEMENT_TIME).cte("due")
    return sa.select(
        sa.select(sa.func.count()).select_from(inserted).scalar_subquery(),
        notify_queues(due, notify),
        _notify_scheduled(inserted, notify),
    )


def _notify_scheduled(inserted: sa.CTE, notify: bool) -> sa.ColumnElement[Any]:
    """Tell idle workers when the soonest new scheduled job of each queue comes due.

    One NOTIFY per queue, ``<queue><SCHEDULED_MARK><seconds>`` (see
    :func:`~celery_pgqueue.store.listener.wake_note`): a worker waiting longer than
    that moves its wake-up earlier without asking the database.
    """
    if not notify:
        return sa.literal(0)
    soonest = (
        sa.select(
            inserted.c.queue_name,
            sa.func.min(inserted.c.run_at).label("run_at"),
        )
        .where(inserted.c.run_at > STATEMENT_TIME)
        .group_by(inserted.c.queue_name)
        .subquery("scheduled")
    )
    seconds = sa.extract("epoch", soonest.c.run_at - STATEMENT_TIME)
    payload = (
        soonest.c.queue_name
        + sa.literal(SCHEDULED_MARK)
        + sa.cast(sa.func.round(sa.cast(seconds, sa.Numeric), 3), sa.Text)
    )
    channel = sa.bindparam("p_channel", type_=sa.String)
    return (
        sa.select(sa.func.count(sa.func.pg_notify(channel, payload)))
        .select_from(soonest)
        .scalar_subquery()
    )


def insert_call(*, new_jobs: Sequence[NewJob], channel: str | None) -> Call:
    """Insert (or, for a re-published task id, re-queue) jobs in one statement.

    A task id already present goes back to ``queued`` with its new payload and
    ``run_at``; its ``attempt_count`` and logs stay (Celery's ``retry`` does this). A
    cancelled job stays cancelled: cancel is durable. ``channel`` set: workers are
    notified at commit, once per queue with a job due now and once per queue with
    scheduled jobs (when the soonest comes due). Returns one row: the number of rows
    written.
    """
    params: dict[str, Any]
    if len(new_jobs) == 1:
        [job] = new_jobs
        params = {
            "p_id": job.id,
            "p_queue_name": job.queue_name,
            "p_payload": job.payload,
            "p_priority": job.priority,
            "p_run_at": job.run_at,
            "p_max_attempts": job.max_attempts,
            "p_ttl": job.ttl_seconds,
            "p_delay": job.delay_seconds,
        }
        if channel is not None:
            params["p_channel"] = channel
        return Call(_insert_statement(channel is not None, single=True), params)
    params = {
        "p_ids": [j.id for j in new_jobs],
        "p_queues": [j.queue_name for j in new_jobs],
        "p_payloads": [j.payload for j in new_jobs],
        "p_priorities": [j.priority for j in new_jobs],
        "p_run_ats": [j.run_at for j in new_jobs],
        "p_max_attempts": [j.max_attempts for j in new_jobs],
        "p_ttls": [j.ttl_seconds for j in new_jobs],
        "p_delays": [j.delay_seconds for j in new_jobs],
    }
    if channel is not None:
        params["p_channel"] = channel
    return Call(_insert_statement(channel is not None), params)


def insert(conn: sa.Connection, *, new_jobs: Sequence[NewJob], channel: str | None) -> int:
    """:func:`insert_call` on ``conn``: the number of rows written."""
    if not new_jobs:
        return 0
    row = insert_call(new_jobs=new_jobs, channel=channel).first(conn)
    return int(row[0]) if row else 0


@functools.cache
def _claim_statement(with_acks: bool = False) -> sa.Executable:
    active = sa.exists().where(
        job_queues.c.name == sa.bindparam("p_queue_name"), job_queues.c.is_active
    )
    ready = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.queue_name == sa.bindparam("p_queue_name"),
            IS_QUEUED,
            jobs.c.run_at <= sa.func.now(),
            sa.or_(jobs.c.expires_at.is_(None), jobs.c.expires_at > sa.func.now()),
            active,
        )
        .order_by(jobs.c.priority, jobs.c.run_at, jobs.c.created_at)
        # Rendered, not bound: under a generic plan a bound LIMIT is guessed as 10% of
        # the ready rows, and the UPDATE then hash-joins the whole table.
        .limit(sa.bindparam("p_limit", type_=sa.Integer, literal_execute=True))
        .with_for_update(skip_locked=True)
        .cte("ready")
    )
    claimed = (
        sa.update(jobs)
        .where(jobs.c.id == ready.c.id)
        .values(
            status=JobStatus.RUNNING.value,
            attempt_count=jobs.c.attempt_count + 1,
            started_at=sa.func.now(),
            lease_owner=sa.bindparam("p_owner", type_=sa.String),
            lease_expires_at=sa.func.now() + sa.bindparam("p_lease", type_=sa.Float) * SECOND,
            acked_at=None,
            updated_at=sa.func.now(),
        )
        .returning(
            jobs.c.id,
            jobs.c.queue_name,
            jobs.c.payload,
            jobs.c.priority,
            jobs.c.attempt_count,
            jobs.c.max_attempts,
            jobs.c.run_at,
            jobs.c.created_at,
            jobs.c.expires_at,
        )
        .cte("claimed")
    )
    opened = (
        sa.insert(job_logs)
        .from_select(
            ["job_id", "attempt_number", "status", "started_at"],
            sa.select(
                claimed.c.id,
                claimed.c.attempt_count,
                sa.literal(LogStatus.ATTEMPTING.value),
                sa.func.now(),
            ),
        )
        .cte("opened")
    )
    stmt = (
        sa.select(
            claimed.c.id,
            claimed.c.queue_name,
            claimed.c.payload,
            claimed.c.priority,
            claimed.c.attempt_count,
            claimed.c.max_attempts,
            # The worker's own expiry check must agree with the database's clock.
            sa.cast(sa.extract("epoch", claimed.c.expires_at - sa.func.now()), sa.Float),
        )
        .add_cte(opened)
        .order_by(claimed.c.priority, claimed.c.run_at, claimed.c.created_at)
    )
    if with_acks:
        # Pending early acks ride along: they touch running rows, the claim queued
        # ones, so the two updates never meet the same row.
        stmt = stmt.add_cte(_ack_update().cte("acked"))
    return stmt


def claim_call(
    *,
    queue_name: str,
    limit: int,
    owner: str,
    lease_seconds: float,
    acked: Sequence[tuple[UUID, int]] = (),
) -> Call:
    """Take up to ``limit`` due jobs of an active queue, lowest priority number first.

    The locking SELECT is a CTE so ``LIMIT`` and ``SKIP LOCKED`` apply before the
    update: concurrent claimers pass over each other's rows instead of waiting, and
    each row is claimed by exactly one of them. Opening the attempt's ``job_logs`` row
    rides in the same statement: a claim is one round trip. ``acked`` records
    deferred early acks (see :func:`mark_acked`) in the same statement. Rows are
    :class:`ClaimedJob` fields.
    """
    params = {
        "p_queue_name": queue_name,
        "p_limit": limit,
        "p_owner": owner,
        "p_lease": lease_seconds,
    }
    if acked:
        params.update(held_params(acked))
    return Call(_claim_statement(bool(acked)), params, literals=(limit,))


def claim(
    conn: sa.Connection,
    *,
    queue_name: str,
    limit: int,
    owner: str,
    lease_seconds: float,
    acked: Sequence[tuple[UUID, int]] = (),
) -> list[ClaimedJob]:
    """:func:`claim_call` on ``conn``."""
    call = claim_call(
        queue_name=queue_name, limit=limit, owner=owner, lease_seconds=lease_seconds, acked=acked
    )
    return [ClaimedJob(*row) for row in call.rows(conn)]


def _ack_update() -> sa.Update:
    """``acked_at`` for the bound (id, attempt) pairs still running and not yet acked."""
    return (
        sa.update(jobs)
        .where(IS_RUNNING, is_held(held_pairs()), jobs.c.acked_at.is_(None))
        .values(acked_at=sa.func.now())
    )


@functools.cache
def _mark_acked_statement() -> sa.Executable:
    return _ack_update()


def mark_acked(conn: sa.Connection, *, held: Sequence[tuple[UUID, int]]) -> int:
    """Record early acks: from now a lost worker means failed, not requeue."""
    if not held:
        return 0
    return conn.execute(_mark_acked_statement(), held_params(held)).rowcount


@functools.cache
def _requeue_statement(notify: bool) -> sa.Executable:
    pairs = held_pairs()
    moved = (
        sa.update(jobs)
        .where(IS_RUNNING, is_held(pairs))
        .values(
            status=JobStatus.QUEUED.value,
            lease_owner=None,
            lease_expires_at=None,
            acked_at=None,
            updated_at=sa.func.now(),
        )
        .returning(jobs.c.id, jobs.c.attempt_count, jobs.c.queue_name)
        .cte("moved")
    )
    closed = close_attempts(moved, LogStatus.RETRY.value, "requeued")
    return (
        sa.select(sa.func.count(), notify_queues(moved, notify)).select_from(moved).add_cte(closed)
    )


def requeue(conn: sa.Connection, *, held: Sequence[tuple[UUID, int]], channel: str | None) -> int:
    """Put held jobs back in line (reject with requeue, warm shutdown, restore).

    Only rows still ``running`` at that attempt move, so a late requeue can't rerun
    finished work or steal a newer attempt. The attempt's log row is closed as
    ``retry``.
    """
    if not held:
        return 0
    params = held_params(held)
    if channel is not None:
        params["p_channel"] = channel
    row = conn.execute(_requeue_statement(channel is not None), params).first()
    return int(row[0]) if row else 0


@functools.cache
def _finish_statement(
    status: JobStatus,
    log_status: LogStatus | None,
    fenced: bool,
    with_result: bool,
    with_max_attempts: bool,
    with_run_at: bool,
    announce: bool = False,
) -> sa.Executable:
    values: dict[str, Any] = {"status": status.value, "updated_at": sa.func.now()}
    if with_result:
        values["result"] = sa.bindparam("p_result", type_=JSONB)
    if with_max_attempts:
        values["max_attempts"] = sa.bindparam("p_max_attempts", type_=sa.Integer)
    if status is JobStatus.COMPLETED:
        values["completed_at"] = sa.func.now()
    elif status is JobStatus.FAILED:
        values["failed_at"] = sa.func.now()
        values["last_error_message"] = sa.bindparam("p_error_message", type_=sa.String)
    elif status is JobStatus.RUNNING:
        values["started_at"] = sa.func.coalesce(jobs.c.started_at, sa.func.now())
    if status in (JobStatus.QUEUED, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
        values.update(lease_owner=None, lease_expires_at=None)
    if status is JobStatus.QUEUED and with_run_at:
        values["run_at"] = sa.bindparam("p_run_at", type_=TZ)
    job_id = sa.bindparam("p_job_id", type_=PG_UUID(as_uuid=True))
    conditions = [jobs.c.id == job_id, jobs.c.status != status_literal(JobStatus.COMPLETED)]
    if fenced:
        conditions.append(jobs.c.attempt_count == sa.bindparam("p_attempt", type_=sa.Integer))
        if status is JobStatus.QUEUED:
            # RETRY only records the state: Task.retry() re-published the message
            # first, which put the row back in line. A row still running was never
            # re-published (Celery's cold shutdown cancels early-acked tasks as
            # "RETRY"): requeueing it here would run an acked task twice.
            conditions.append(IS_QUEUED)
    inline = announce and status is JobStatus.COMPLETED and with_result
    returned: list[Any] = [jobs.c.id]
    if inline:
        returned += [sa.cast(jobs.c.result, sa.Text).label("result_text"), jobs.c.completed_at]
    updated = (
        sa.update(jobs).where(*conditions).values(**values).returning(*returned).cte("updated")
    )
    stmt = sa.select(sa.func.count()).select_from(updated)
    if announce:
        # The result backend's waiters: woken at commit, and only if the row changed.
        # A success small enough rides in the notification (see notify.result_note),
        # so the waiter need not read it back.
        channel = sa.bindparam("p_result_channel", type_=sa.String)
        message: Any = sa.cast(updated.c.id, sa.Text)
        if inline:
            message = sa.case(
                (
                    sa.func.octet_length(updated.c.result_text) <= fixed(INLINE_RESULT_BYTES),
                    message
                    + " "
                    + sa.cast(sa.extract("epoch", updated.c.completed_at), sa.Text)
                    + " "
                    + updated.c.result_text,
                ),
                else_=message,
            )
        stmt = stmt.add_columns(sa.func.count(sa.func.pg_notify(channel, message)))
    if log_status is None:
        return stmt
    # The attempt's log row is closed even when the job row has moved on (a retry
    # re-published and claimed before this write): it records what this attempt did.
    this_attempt = (
        sa.bindparam("p_attempt", type_=sa.Integer)
        if fenced
        else sa.select(jobs.c.attempt_count).where(jobs.c.id == job_id).scalar_subquery()
    )
    closed = (
        sa.update(job_logs)
        .where(
            job_logs.c.job_id == job_id,
            job_logs.c.attempt_number == this_attempt,
            job_logs.c.status == LogStatus.ATTEMPTING.value,
        )
        .values(
            status=log_status.value,
            finished_at=sa.func.now(),
            duration=sa.func.now() - job_logs.c.started_at,
            log_message=sa.bindparam("p_log_message", type_=sa.Text),
        )
        .cte("closed")
    )
    return stmt.add_cte(closed)


def finish_call(
    *,
    job_id: UUID,
    attempt: int | None,
    status: JobStatus,
    log_status: LogStatus | None,
    error_message: str | None = None,
    log_message: str | None = None,
    result: Any = None,
    max_attempts: int | None = None,
    run_at: Any = None,
    result_channel: str | None = None,
) -> Call:
    """Move a job to ``status`` and close its current attempt's log row.

    ``attempt`` fences the write to the delivery that ran it; ``None`` accepts any
    attempt (result-backend writes for tasks that arrived through another broker).
    A finished success is never overwritten. A fenced ``queued`` (RETRY) only updates
    a row its retry already re-queued; it never requeues a running one itself.
    ``result_channel``: NOTIFY it with the job id when the row changed, in this same
    statement (the result backend's ready states). One row: the rows changed.
    """
    stmt = _finish_statement(
        status,
        log_status,
        attempt is not None,
        result is not None,
        max_attempts is not None,
        run_at is not None,
        result_channel is not None,
    )
    params: dict[str, Any] = {
        "p_job_id": job_id,
        "p_attempt": attempt,
        "p_result": result,
        "p_max_attempts": max_attempts,
        "p_run_at": run_at,
        # text columns refuse NUL and lone surrogates: such characters become escapes.
        "p_error_message": printable(error_message or "")[:255] or None,
        "p_log_message": printable(log_message) if log_message else log_message,
        "p_result_channel": result_channel,
    }
    return Call(stmt, params)


@functools.cache
def _heartbeat_statement() -> sa.Executable:
    return (
        sa.update(jobs)
        .where(
            IS_RUNNING,
            jobs.c.lease_owner == sa.bindparam("p_owner", type_=sa.String),
            jobs.c.id == sa.func.any(sa.bindparam("p_ids", type_=ARRAY(PG_UUID(as_uuid=True)))),
        )
        .values(lease_expires_at=sa.func.now() + sa.bindparam("p_lease", type_=sa.Float) * SECOND)
    )


def heartbeat(
    conn: sa.Connection, *, owner: str, job_ids: Sequence[UUID], lease_seconds: float
) -> int:
    """Extend the leases ``owner`` still holds on ``job_ids``; one statement per beat.

    Only jobs the worker can vouch for are extended: a job whose pool process died
    lets its lease lapse, and rescue then settles it.
    """
    if not job_ids:
        return 0
    params = {"p_owner": owner, "p_ids": list(job_ids), "p_lease": lease_seconds}
    return conn.execute(_heartbeat_statement(), params).rowcount


@functools.cache
def _delete_held_statement() -> sa.Executable:
    return sa.delete(jobs).where(is_held(held_pairs()))


def delete_held(conn: sa.Connection, *, held: Sequence[tuple[UUID, int]]) -> int:
    """Remove consumed messages that are not Celery tasks: they keep no history."""
    if not held:
        return 0
    return conn.execute(_delete_held_statement(), held_params(held)).rowcount
