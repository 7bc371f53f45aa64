"""Statements on ``jobs``: enqueue, claim, ack, finish, requeue, rescue, prune.

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

from celery_pgqueue.states import EXPIRED_MESSAGE, JobStatus, LogStatus
from celery_pgqueue.storable import printable
from celery_pgqueue.store.hot import Call
from celery_pgqueue.store.listener import SCHEDULED_MARK
from celery_pgqueue.store.notify import INLINE_RESULT_BYTES
from celery_pgqueue.store.records import ClaimedJob, NewJob
from celery_pgqueue.store.tables import TZ, job_logs, job_queues, jobs


def _status(status: JobStatus) -> sa.BindParameter[str]:
    # Rendered into the SQL text, not bound: a generic (prepared) plan can then still
    # match the partial indexes declared WHERE status = '...'.
    return sa.literal(status.value, literal_execute=True)


# Running rows without any lease taken back per rescue pass (see rescue_expired).
UNLEASED_PER_PASS = 10

IS_QUEUED = jobs.c.status == _status(JobStatus.QUEUED)
IS_RUNNING = jobs.c.status == _status(JobStatus.RUNNING)
SECOND = sa.text("interval '1 second'")


def _notify_queues(changed: sa.CTE, notify: bool) -> sa.ColumnElement[Any]:
    """Count of NOTIFYs sent, one per distinct queue in ``changed`` (fired at commit).

    The channel is the bound parameter ``channel``.
    """
    if not notify:
        return sa.literal(0)
    distinct = sa.select(changed.c.queue_name).distinct().subquery("notified")
    channel = sa.bindparam("p_channel", type_=sa.String)
    return (
        sa.select(sa.func.count(sa.func.pg_notify(channel, distinct.c.queue_name)))
        .select_from(distinct)
        .scalar_subquery()
    )


def _held_pairs() -> sa.TableValuedAlias:
    """``(id, attempt)`` pairs from two bound arrays: one SQL text for any count."""
    return (
        sa.func.unnest(
            sa.bindparam("p_held_ids", type_=ARRAY(PG_UUID(as_uuid=True))),
            sa.bindparam("p_held_attempts", type_=ARRAY(sa.Integer)),
        )
        .table_valued("id", "attempt")
        .render_derived(name="held", with_types=False)
    )


def _close_attempts(changed: sa.CTE, status: Any, message: str) -> sa.CTE:
    """Close the open log row of each changed job's current attempt (a CTE)."""
    return (
        sa.update(job_logs)
        .where(
            job_logs.c.job_id == changed.c.id,
            job_logs.c.attempt_number == changed.c.attempt_count,
            job_logs.c.status == LogStatus.ATTEMPTING.value,
        )
        .values(
            status=status,
            finished_at=sa.func.now(),
            duration=sa.func.now() - job_logs.c.started_at,
            log_message=message,
        )
        .cte("closed")
    )


def _held_params(held: Sequence[tuple[UUID, int]]) -> dict[str, Any]:
    return {"p_held_ids": [h[0] for h in held], "p_held_attempts": [int(h[1]) for h in held]}


def _is_held(pairs: sa.TableValuedAlias) -> sa.ColumnElement[bool]:
    return sa.tuple_(jobs.c.id, jobs.c.attempt_count).in_(sa.select(pairs.c.id, pairs.c.attempt))


# Statements on the hot path are built once: constructing a Core statement costs more
# than executing it. Each takes its values as bound parameters named p_*: a parameter
# named like a column would make SQLAlchemy add it to an UPDATE's SET clause.


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
        where=jobs.c.status != _status(JobStatus.CANCELLED),
    ).returning(jobs.c.queue_name, jobs.c.run_at)
    inserted = stmt.cte("inserted")
    due = sa.select(inserted.c.queue_name).where(inserted.c.run_at <= STATEMENT_TIME).cte("due")
    return sa.select(
        sa.select(sa.func.count()).select_from(inserted).scalar_subquery(),
        _notify_queues(due, notify),
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
        params.update(_held_params(acked))
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
        .where(IS_RUNNING, _is_held(_held_pairs()), jobs.c.acked_at.is_(None))
        .values(acked_at=sa.func.now())
    )


@functools.cache
def _mark_acked_statement() -> sa.Executable:
    return _ack_update()


def mark_acked(conn: sa.Connection, *, held: Sequence[tuple[UUID, int]]) -> int:
    """Record early acks: from now a lost worker means failed, not requeue."""
    if not held:
        return 0
    return conn.execute(_mark_acked_statement(), _held_params(held)).rowcount


@functools.cache
def _requeue_statement(notify: bool) -> sa.Executable:
    pairs = _held_pairs()
    moved = (
        sa.update(jobs)
        .where(IS_RUNNING, _is_held(pairs))
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
    closed = _close_attempts(moved, LogStatus.RETRY.value, "requeued")
    return (
        sa.select(sa.func.count(), _notify_queues(moved, notify)).select_from(moved).add_cte(closed)
    )


def requeue(conn: sa.Connection, *, held: Sequence[tuple[UUID, int]], channel: str | None) -> int:
    """Put held jobs back in line (reject with requeue, warm shutdown, restore).

    Only rows still ``running`` at that attempt move, so a late requeue can't rerun
    finished work or steal a newer attempt. The attempt's log row is closed as
    ``retry``.
    """
    if not held:
        return 0
    params = _held_params(held)
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
    conditions = [jobs.c.id == job_id, jobs.c.status != _status(JobStatus.COMPLETED)]
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
    return sa.delete(jobs).where(_is_held(_held_pairs()))


def delete_held(conn: sa.Connection, *, held: Sequence[tuple[UUID, int]]) -> int:
    """Remove consumed messages that are not Celery tasks: they keep no history."""
    if not held:
        return 0
    return conn.execute(_delete_held_statement(), _held_params(held)).rowcount


def rescue_expired(
    conn: sa.Connection,
    *,
    limit: int,
    channel: str | None,
    result_channel: str | None = None,
    spare: tuple[str, Sequence[UUID]] | None = None,
) -> tuple[int, int]:
    """Take back running jobs whose lease ran out (their worker died or hung).

    Not yet acked (``acks_late``, or prefetched and never started): back to ``queued``
    for another attempt, unless ``max_attempts`` is spent. Acked early: the task may
    have run, so it is marked failed rather than run twice. Returns (requeued, failed).

    A running row the transport made (it has a payload) with no lease at all was
    edited by hand: no heartbeat will ever extend it, so it counts as expired rather
    than staying ``running`` forever. Rows the result backend made for another broker
    have no payload and no lease, and are left alone.

    ``spare``: ``(owner, job ids)`` the calling process still holds (its lease keeper
    renews them). Its own pass never takes those back, however late their renewal
    after a stall of the process; another process's pass still does.
    """
    # Two lookups, each an index condition on ix_jobs_lease (an OR of them would be
    # a filter over every running row). Unleased rows are rare (hand edits): a few per
    # pass, as a literal LIMIT, so the planner does not expect thousands (its guess
    # for IS NULL comes from every row of jobs) and keeps to index probes.
    lapsed_lease = [IS_RUNNING, jobs.c.lease_expires_at < sa.func.now()]
    if spare is not None and spare[1]:
        owner, held = spare
        lapsed_lease.append(
            sa.or_(
                jobs.c.lease_owner.is_distinct_from(owner),
                jobs.c.id != sa.all_(sa.literal(list(held), ARRAY(PG_UUID(as_uuid=True)))),
            )
        )
    expired = (
        sa.select(jobs.c.id)
        .where(*lapsed_lease)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("expired")
    )
    unleased = (
        sa.select(jobs.c.id)
        .where(IS_RUNNING, jobs.c.lease_expires_at.is_(None), jobs.c.payload.is_not(None))
        .limit(fixed(UNLEASED_PER_PASS))
        .with_for_update(skip_locked=True)
        .cte("unleased")
    )
    lapsed = sa.union_all(sa.select(expired.c.id), sa.select(unleased.c.id)).cte("lapsed")
    exhausted = sa.and_(
        jobs.c.max_attempts.is_not(None), jobs.c.attempt_count >= jobs.c.max_attempts
    )
    to_fail = sa.or_(jobs.c.acked_at.is_not(None), exhausted)
    updated = (
        sa.update(jobs)
        .where(jobs.c.id == lapsed.c.id)
        .values(
            status=sa.case((to_fail, JobStatus.FAILED.value), else_=JobStatus.QUEUED.value),
            failed_at=sa.case((to_fail, sa.func.now()), else_=None),
            last_error_message=sa.case(
                (
                    jobs.c.acked_at.is_not(None),
                    sa.literal("WorkerLostError: worker lost while running the task (")
                    + sa.func.coalesce(jobs.c.lease_owner, "?")
                    + ")",
                ),
                (exhausted, sa.literal("WorkerLostError: max_attempts reached after worker loss")),
                else_=jobs.c.last_error_message,
            ),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=sa.func.now(),
        )
        .returning(jobs.c.id, jobs.c.attempt_count, jobs.c.status, jobs.c.queue_name)
        .cte("updated")
    )
    closed = _close_attempts(
        updated,
        sa.case(
            (updated.c.status == JobStatus.FAILED.value, LogStatus.FAILED.value),
            else_=LogStatus.RETRY.value,
        ),
        "worker lost (lease expired)",
    )
    requeued = sa.func.count().filter(updated.c.status == JobStatus.QUEUED.value)
    failed = sa.func.count().filter(updated.c.status == JobStatus.FAILED.value)
    back = sa.select(updated.c.queue_name).where(updated.c.status == JobStatus.QUEUED.value)
    lost = sa.select(updated.c.id).where(updated.c.status == JobStatus.FAILED.value).cte("lost")
    row = conn.execute(
        sa.select(
            requeued,
            failed,
            _notify_queues(back.cte("back"), channel is not None),
            _announce(lost, result_channel),
        )
        .select_from(updated)
        .add_cte(closed),
        {"p_channel": channel},
    ).first()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _announce(changed: sa.CTE, result_channel: str | None) -> sa.ColumnElement[Any]:
    """NOTIFY each changed job id on the result backend's channel (woken ``get()``)."""
    if result_channel is None:
        return sa.literal(0)
    return (
        sa.select(sa.func.count(sa.func.pg_notify(result_channel, sa.cast(changed.c.id, sa.Text))))
        .select_from(changed)
        .scalar_subquery()
    )


#: ``last_error_message`` of a job cancelled by Celery's ``revoke()``: workers remember
#: the id, so a retry must refuse it (see :func:`cancel_reasons`).
REVOKED_MESSAGE = "TaskRevokedError: revoked"


def cancel(
    conn: sa.Connection,
    *,
    job_ids: Sequence[UUID],
    result_channel: str | None = None,
    reason: str | None = None,
) -> int:
    """Cancel jobs that have not started: durable, no worker will ever claim them.

    Clients already waiting in ``get()`` are woken (``result_channel``); ``reason``
    becomes the job's ``last_error_message``.
    """
    if not job_ids:
        return 0
    values: dict[str, Any] = {"status": JobStatus.CANCELLED.value, "updated_at": sa.func.now()}
    if reason is not None:
        values["last_error_message"] = reason
    cancelled = (
        sa.update(jobs)
        .where(jobs.c.id.in_(list(job_ids)), IS_QUEUED)
        .values(**values)
        .returning(jobs.c.id)
        .cte("cancelled")
    )
    row = conn.execute(
        sa.select(sa.func.count(), _announce(cancelled, result_channel)).select_from(cancelled)
    ).first()
    return int(row[0]) if row else 0


def retry(conn: sa.Connection, *, job_ids: Sequence[UUID], channel: str | None) -> int:
    """A failed or cancelled job back to ``queued`` now; its attempt history stays."""
    if not job_ids:
        return 0
    moved = (
        sa.update(jobs)
        .where(
            jobs.c.id.in_(list(job_ids)),
            jobs.c.status.in_([JobStatus.FAILED.value, JobStatus.CANCELLED.value]),
            jobs.c.payload.is_not(None),
        )
        .values(
            status=JobStatus.QUEUED.value,
            run_at=sa.func.now(),
            failed_at=None,
            result=None,
            lease_owner=None,
            lease_expires_at=None,
            acked_at=None,
            updated_at=sa.func.now(),
        )
        .returning(jobs.c.queue_name)
        .cte("moved")
    )
    row = conn.execute(
        sa.select(sa.func.count(), _notify_queues(moved, channel is not None)).select_from(moved),
        {"p_channel": channel},
    ).first()
    return int(row[0]) if row else 0


def purge(conn: sa.Connection, *, queue_name: str) -> int:
    """Delete a queue's waiting jobs (queued, due or scheduled); running jobs stay."""
    result = conn.execute(sa.delete(jobs).where(jobs.c.queue_name == queue_name, IS_QUEUED))
    return result.rowcount


def count_waiting(conn: sa.Connection, *, queue_name: str) -> int:
    """Queued jobs in a queue, due or not (Kombu's queue size)."""
    return int(
        conn.execute(
            sa.select(sa.func.count()).where(jobs.c.queue_name == queue_name, IS_QUEUED)
        ).scalar_one()
    )


def delete(conn: sa.Connection, *, job_ids: Sequence[UUID]) -> int:
    """Remove jobs and (by cascade) their logs: ``forget()``."""
    if not job_ids:
        return 0
    return conn.execute(sa.delete(jobs).where(jobs.c.id.in_(list(job_ids)))).rowcount


def get(conn: sa.Connection, *, job_id: UUID) -> sa.Row[Any] | None:
    """One job row, every column."""
    return conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()


def get_results(conn: sa.Connection, *, job_ids: Sequence[UUID]) -> list[sa.Row[Any]]:
    """``(id, status, result)`` of several jobs in one round trip."""
    return list(
        conn.execute(
            sa.select(jobs.c.id, jobs.c.status, jobs.c.result).where(jobs.c.id.in_(list(job_ids)))
        )
    )


def prune_finished(
    conn: sa.Connection, *, status: JobStatus, older_than: float, limit: int, dry_run: bool
) -> int:
    """Delete up to ``limit`` finished jobs older than ``older_than`` seconds.

    Bounded per call so each transaction stays short; the caller loops. Maintenance
    runs this every few seconds, usually to find nothing, so it must stay an index
    probe under a generic plan: see :func:`_delete_jobs` and :func:`fixed`.
    """
    victims = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.status == _status(status),
            jobs.c.updated_at < sa.func.now() - fixed(older_than) * SECOND,
        )
        .limit(fixed(limit))
    )
    if dry_run:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(victims.subquery())).scalar_one()
        )
    return _delete_jobs(conn, victims)


def fixed(value: float) -> sa.BindParameter[Any]:
    """A per-process constant (a retention, a batch size) rendered into the SQL text.

    As a bound parameter, a generic plan can't see it: ``updated_at < now() - $1``
    is then guessed to match a third of the table, and ``LIMIT $2`` a tenth, and the
    planner picks a sequential scan, which a pass with nothing to delete reads to
    the end. As a literal the planner estimates from the histogram; the SQL text
    stays the same for the life of the process, so it is still prepared once.
    """
    return sa.literal(value, literal_execute=True)


def _delete_jobs(conn: sa.Connection, victims: sa.Select[Any]) -> int:
    """Delete the (locked, skipped if busy) rows ``victims`` selects; return how many.

    ``id = ANY(ARRAY(…))`` rather than a join: the ids are collected first, then each
    is one primary-key probe, whatever the planner guesses about their number (a
    join to a CTE can turn into a hash join over a scan of all of jobs).
    """
    chosen = sa.func.array(victims.with_for_update(skip_locked=True).scalar_subquery())
    deleted = sa.delete(jobs).where(jobs.c.id == sa.any_(chosen)).returning(jobs.c.id)
    return len(conn.execute(deleted).all())


# -- operations (CLI, maintenance) -------------------------------------------------


def find(
    conn: sa.Connection,
    *,
    queues: Sequence[str] = (),
    statuses: Sequence[JobStatus] = (),
    task: str | None = None,
    changed_within: float | None = None,
    changed_since: Any = None,
    scheduled: bool = False,
    limit: int,
) -> list[sa.Row[Any]]:
    """Jobs matching every given filter, most recently changed first.

    For operators (``pgqueue jobs``): ``changed_within`` is seconds by the database's
    clock, so an operator's skewed laptop clock can't hide recent failures.
    ``scheduled``: only waiting jobs not due yet (countdown, ETA, a retry's delay), by
    the same clock, soonest first: what ``celery inspect scheduled`` lists on brokers
    whose workers hold such tasks in memory.
    """
    stmt = sa.select(jobs)
    if scheduled:
        stmt = stmt.where(IS_QUEUED, jobs.c.run_at > sa.func.now())
    if queues:
        stmt = stmt.where(jobs.c.queue_name.in_(list(queues)))
    if statuses:
        stmt = stmt.where(jobs.c.status.in_([s.value for s in statuses]))
    if task is not None:
        stmt = stmt.where(jobs.c.payload["headers"]["task"].astext == task)
    if changed_within is not None:
        stmt = stmt.where(jobs.c.updated_at >= sa.func.now() - sa.literal(changed_within) * SECOND)
    if changed_since is not None:
        stmt = stmt.where(jobs.c.updated_at >= changed_since)
    if scheduled:
        stmt = stmt.order_by(jobs.c.run_at, jobs.c.priority, jobs.c.id).limit(limit)
    else:
        stmt = stmt.order_by(jobs.c.updated_at.desc(), jobs.c.id).limit(limit)
    return list(conn.execute(stmt))


def cancel_reasons(
    conn: sa.Connection, *, job_ids: Sequence[UUID]
) -> list[tuple[UUID, str | None, str | None]]:
    """Of these jobs, the cancelled ones: id, ``last_error_message``, last log message.

    Together they tell a job Celery revoked or expired (which workers remember by id)
    from one an operator cancelled.
    """
    if not job_ids:
        return []
    last_log = (
        sa.select(job_logs.c.log_message)
        .where(job_logs.c.job_id == jobs.c.id)
        .order_by(job_logs.c.attempt_number.desc(), job_logs.c.started_at.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = conn.execute(
        sa.select(jobs.c.id, jobs.c.last_error_message, last_log).where(
            jobs.c.id.in_(list(job_ids)), jobs.c.status == _status(JobStatus.CANCELLED)
        )
    ).all()
    return [(row[0], row[1], row[2]) for row in rows]


def ids_between(conn: sa.Connection, *, low: UUID, high: UUID, limit: int) -> list[UUID]:
    """Job ids in ``[low, high]``: an id prefix as a range the primary key can scan."""
    rows = conn.execute(
        sa.select(jobs.c.id).where(jobs.c.id.between(low, high)).order_by(jobs.c.id).limit(limit)
    ).all()
    return [row[0] for row in rows]


def statuses(conn: sa.Connection, *, job_ids: Sequence[UUID]) -> dict[UUID, str]:
    """The status of each id that exists (absent ids are missing from the result)."""
    if not job_ids:
        return {}
    rows = conn.execute(
        sa.select(jobs.c.id, jobs.c.status).where(jobs.c.id.in_(list(job_ids)))
    ).all()
    return {row[0]: row[1] for row in rows}


def count_prunable(conn: sa.Connection, *, status: JobStatus, older_than: float) -> int:
    """How many jobs ``prune_finished`` would delete now, uncapped (a dry run's answer)."""
    return int(
        conn.execute(
            sa.select(sa.func.count()).where(
                jobs.c.status == _status(status),
                jobs.c.updated_at < sa.func.now() - fixed(older_than) * SECOND,
            )
        ).scalar_one()
    )


IS_TASK = sa.or_(
    sa.func.coalesce(jobs.c.payload["headers"].has_key("task"), sa.false()),
    # task_protocol=1 names the task in a JSON body (an object: a protocol 2 body is an
    # array, where ``?`` would test the elements).
    sa.and_(
        sa.func.jsonb_typeof(jobs.c.payload["body"]) == "object",
        sa.func.coalesce(jobs.c.payload["body"].has_key("task"), sa.false()),
    ),
)
"""A Celery task message (protocol 2 headers or a protocol 1 body name the task), not
transient traffic."""

IS_EXPIRED = sa.and_(IS_QUEUED, jobs.c.expires_at.is_not(None), jobs.c.expires_at <= sa.func.now())
"""Still waiting when its TTL (Kombu ``expiration``, Celery ``expires``) ran out."""


def drop_expired(conn: sa.Connection, *, limit: int) -> int:
    """Delete up to ``limit`` waiting messages whose TTL has passed.

    A TTL comes from the message (Kombu ``expiration``), its queue (``x-message-ttl``)
    or, for Celery's control replies and events only, the ``message_ttl`` option; a
    transient message nobody consumed in time is never delivered, so it is deleted
    rather than kept as history. Expired Celery tasks are recorded instead
    (:func:`expire_tasks`). ``ix_jobs_expiring`` holds only rows with a TTL: with none
    expired this is one probe.
    """
    return _delete_jobs(
        conn,
        sa.select(jobs.c.id).where(IS_EXPIRED, sa.not_(IS_TASK)).limit(fixed(limit)),
    )


def expire_tasks(
    conn: sa.Connection,
    *,
    limit: int,
    job_ids: Sequence[UUID] | None = None,
    result_channel: str | None = None,
) -> int:
    """Cancel up to ``limit`` tasks still queued past their ``expires``; how many.

    Celery ends such a task REVOKED ("expired"), so the row stays, ``cancelled``, under
    the normal retention, with a log row saying why (as an attempt that never started,
    like a worker's drop on delivery). ``job_ids`` limits it to those jobs (a client
    waiting on them). Waiting ``get()`` calls are woken (``result_channel``).
    """
    victims = sa.select(jobs.c.id).where(IS_EXPIRED, IS_TASK)
    if job_ids is not None:
        victims = victims.where(jobs.c.id == sa.any_(_ids_param()))
    chosen = victims.limit(fixed(limit)).with_for_update(skip_locked=True).cte("chosen")
    expired = (
        sa.update(jobs)
        .where(jobs.c.id == chosen.c.id)
        .values(
            status=JobStatus.CANCELLED.value,
            attempt_count=jobs.c.attempt_count + 1,
            last_error_message=EXPIRED_MESSAGE,
            updated_at=sa.func.now(),
        )
        .returning(jobs.c.id, jobs.c.attempt_count, jobs.c.expires_at)
        .cte("expired")
    )
    logged = (
        sa.insert(job_logs)
        .from_select(
            [
                "job_id",
                "attempt_number",
                "status",
                "started_at",
                "finished_at",
                "duration",
                "log_message",
            ],
            sa.select(
                expired.c.id,
                expired.c.attempt_count,
                sa.literal(LogStatus.FAILED.value),
                sa.func.now(),
                sa.func.now(),
                sa.text("interval '0'"),
                sa.literal("expired: not started before its expires time (")
                + sa.cast(expired.c.expires_at, sa.Text)
                + ")",
            ),
        )
        .cte("logged")
    )
    row = conn.execute(
        sa.select(sa.func.count(), _announce(expired, result_channel))
        .select_from(expired)
        .add_cte(logged),
        {"p_ids": list(job_ids or ())},
    ).first()
    return int(row[0]) if row else 0


def _ids_param() -> sa.BindParameter[Any]:
    return sa.bindparam("p_ids", type_=ARRAY(PG_UUID(as_uuid=True)))


def seconds_to_expiry(conn: sa.Connection, *, job_ids: Sequence[UUID]) -> dict[UUID, float]:
    """Seconds until each still-queued task of ``job_ids`` expires (negative: past).

    Only jobs that can expire are present. By the database's clock, relative, so a
    caller can wait for it on its own monotonic clock.
    """
    if not job_ids:
        return {}
    rows = conn.execute(
        sa.select(
            jobs.c.id,
            sa.cast(sa.extract("epoch", jobs.c.expires_at - sa.func.now()), sa.Float),
        ).where(
            jobs.c.id == sa.any_(_ids_param()),
            IS_QUEUED,
            jobs.c.expires_at.is_not(None),
            IS_TASK,
        ),
        {"p_ids": list(job_ids)},
    ).all()
    return {row[0]: float(row[1]) for row in rows}


# Priority levels a wake-up look-up walks per queue (two index probes each). A queue
# with more distinct priorities is still served: by the poll, at worst.
MAX_PRIORITY_LEVELS = 100


@functools.cache
def _next_due_statement() -> sa.Executable:
    """Seconds until the soonest scheduled job of the given queues (NULL: none).

    ``ix_jobs_ready`` orders a queue's rows by priority first, so the soonest
    ``run_at`` is not its first entry: walk the distinct priorities (one probe each,
    a loose index scan in a recursive CTE) and take each level's first future
    ``run_at`` (one more probe), instead of reading every scheduled row.
    """

    def queued(alias: Any) -> sa.ColumnElement[bool]:
        condition: sa.ColumnElement[bool] = alias.c.status == _status(JobStatus.QUEUED)
        return condition

    names = (
        sa.func.unnest(sa.bindparam("p_queues", type_=ARRAY(sa.String)))
        .table_valued("name")
        .render_derived(name="q")
    )
    first = jobs.alias("first_level")
    levels = sa.select(
        names.c.name.label("queue_name"),
        sa.select(first.c.priority)
        .where(first.c.queue_name == names.c.name, queued(first))
        .order_by(first.c.priority)
        .limit(fixed(1))
        .scalar_subquery()
        .label("priority"),
        fixed(1).label("depth"),
    ).cte("levels", recursive=True)
    after = jobs.alias("next_level")
    levels = levels.union_all(
        sa.select(
            levels.c.queue_name,
            sa.select(after.c.priority)
            .where(
                after.c.queue_name == levels.c.queue_name,
                queued(after),
                after.c.priority > levels.c.priority,
            )
            .order_by(after.c.priority)
            .limit(fixed(1))
            .scalar_subquery(),
            levels.c.depth + 1,
        ).where(levels.c.priority.is_not(None), levels.c.depth < fixed(MAX_PRIORITY_LEVELS))
    )
    row = jobs.alias("soonest_row")
    soonest = (
        sa.select(row.c.run_at)
        .where(
            row.c.queue_name == levels.c.queue_name,
            queued(row),
            row.c.priority == levels.c.priority,
            row.c.run_at > sa.func.now() - sa.bindparam("p_within", type_=sa.Float) * SECOND,
        )
        .order_by(row.c.run_at)
        .limit(fixed(1))
        .lateral("soonest")
    )
    return sa.select(
        sa.cast(sa.extract("epoch", sa.func.min(soonest.c.run_at) - sa.func.now()), sa.Float)
    ).select_from(levels.join(soonest, sa.true()))


def next_due(
    conn: sa.Connection, *, queue_names: Sequence[str], came_due_within: float = 0.0
) -> float | None:
    """Seconds until the soonest job of ``queue_names`` that is not due yet, or None.

    ``came_due_within``: jobs that came due at most that many seconds ago count too (a
    negative answer): a claim that ran just before may have missed them. Older due
    jobs never count, so a paused queue's backlog cannot keep a worker spinning.
    Asked of the database, so the answer is on its clock: a worker waits that long on
    its own monotonic clock, whatever its wall clock says.
    """
    if not queue_names:
        return None
    params = {"p_queues": list(queue_names), "p_within": max(0.0, came_due_within)}
    value = conn.execute(_next_due_statement(), params).scalar()
    return None if value is None else float(value)


def drop_waiting(conn: sa.Connection, *, queue_name: str, limit: int) -> int:
    """Delete up to ``limit`` waiting messages of one queue (its expiry has passed).

    As in RabbitMQ, an expired queue goes with its messages: nobody consumes it any
    more (consumers keep pushing ``expires_at`` forward), so they would wait forever
    and keep the queue row alive through the foreign key. Ordered as the claim reads
    them, so even a generic plan walks ``ix_jobs_ready`` for this one queue.
    """
    return _delete_jobs(
        conn,
        sa.select(jobs.c.id)
        .where(jobs.c.queue_name == queue_name, IS_QUEUED)
        .order_by(jobs.c.priority, jobs.c.run_at, jobs.c.created_at)
        .limit(fixed(limit)),
    )


def is_prunable(*, completed_retention: float, failed_retention: float) -> sa.ColumnElement[bool]:
    """True for a job the next retention pass deletes (what ``prune_finished`` selects)."""

    def older(seconds: float) -> sa.ColumnElement[bool]:
        return jobs.c.updated_at < sa.func.now() - sa.literal(seconds) * SECOND

    return sa.or_(
        sa.and_(
            jobs.c.status.in_([JobStatus.COMPLETED.value, JobStatus.CANCELLED.value]),
            older(completed_retention),
        ),
        sa.and_(jobs.c.status == JobStatus.FAILED.value, older(failed_retention)),
    )
