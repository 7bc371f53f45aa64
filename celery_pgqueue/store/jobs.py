"""The broker's per-task statements on ``jobs``: enqueue, claim, ack, finish, heartbeat.

The SQL is in :mod:`~celery_pgqueue.store.queries`; here each statement gets its
parameters, as a :class:`~celery_pgqueue.store.hot.Call` the store runs on the hot
path (or on a caller's connection). Every write to a job a worker holds is fenced by
``attempt_count``: Celery's retry re-publishes the same task id before the old
delivery is acked, so a late write keyed on the id alone could clobber the next
attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from psycopg.types.json import Jsonb

from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.storable import printable
from celery_pgqueue.store.expressions import fixed as fixed  # re-exported: tests import it here
from celery_pgqueue.store.hot import Call, Row
from celery_pgqueue.store.lookups import MAX_PRIORITY_LEVELS as MAX_PRIORITY_LEVELS
from celery_pgqueue.store.queries import WAKE_QUEUES, Queries, for_schema
from celery_pgqueue.store.records import ClaimedJob, NewJob, one_job_params


def queries_of(conn: sa.Connection) -> Queries:
    """The statements for the schema ``conn``'s engine translates to (public if none)."""
    translated = conn.get_execution_options().get("schema_translate_map") or {}
    return for_schema(translated.get(None) or "public")


def insert_call(queries: Queries, *, new_jobs: Sequence[NewJob], channel: str | None) -> Call:
    """Insert (or, for a re-published task id, re-queue) jobs in one statement.

    A task id already present goes back to ``queued`` with its new payload and
    ``run_at``; its ``attempt_count`` and logs stay (Celery's ``retry`` does this). A
    cancelled job stays cancelled: cancel is durable. ``channel`` set: workers are
    notified at commit, once per queue with a job due now and once per queue with
    scheduled jobs (when the soonest comes due). Returns one row: the number of rows
    written.
    """
    if len(new_jobs) == 1:
        [job] = new_jobs
        return Call(
            queries.enqueue_one,
            one_job_params(job, channel),
        )
    return Call(
        queries.enqueue_many,
        {
            "ids": [j.id for j in new_jobs],
            "queues": [j.queue_name for j in new_jobs],
            "payloads": [Jsonb(j.payload) for j in new_jobs],
            "priorities": [j.priority for j in new_jobs],
            "run_ats": [j.run_at for j in new_jobs],
            "max_attempts": [j.max_attempts for j in new_jobs],
            "ttls": [j.ttl_seconds for j in new_jobs],
            "delays": [j.delay_seconds for j in new_jobs],
            "channel": channel,
        },
    )


def insert(conn: sa.Connection, *, new_jobs: Sequence[NewJob], channel: str | None) -> int:
    """:func:`insert_call` on ``conn``: the number of rows written."""
    if not new_jobs:
        return 0
    row = insert_call(queries_of(conn), new_jobs=new_jobs, channel=channel).first(conn)
    return int(row[0]) if row else 0


def wake_call(channel: str, queues: Sequence[str]) -> Call:
    """One NOTIFY per queue on ``channel``, in a transaction of its own (store.wakeups)."""
    return Call(WAKE_QUEUES, {"channel": channel, "queues": list(queues)})


def held_params(held: Sequence[tuple[UUID, int]]) -> dict[str, Any]:
    """Held deliveries, ``(id, attempt)`` pairs, as the two arrays the SQL unnests."""
    return {"held_ids": [h[0] for h in held], "held_attempts": [int(h[1]) for h in held]}


def claim_call(
    queries: Queries,
    *,
    queue_name: str,
    limit: int,
    owner: str,
    lease_seconds: float,
    acked: Sequence[tuple[UUID, int]] = (),
    limited: bool = False,
    channel: str | None = None,
    drained: str | None = None,
) -> Call:
    """Take up to ``limit`` due jobs of an active queue, lowest priority number first.

    ``acked`` records deferred early acks (see :func:`mark_acked_call`) in the same
    statement. ``limited``: the claim of a queue with a concurrency limit, to run after
    :func:`lock_queue_call` in the same transaction. Read the rows with
    :func:`claimed_jobs`. ``drained``: a note sent on ``channel``, with when the claim
    began appended, if the claim takes fewer than ``limit`` (see
    :func:`~celery_pgqueue.store.listener.claim_note_prefix`).
    """
    params = {
        "queue_name": queue_name,
        "owner": owner,
        "lease": lease_seconds,
        "channel": channel,
        "drained": drained if channel else None,
    }
    if acked:
        params.update(held_params(acked))
    return Call(queries.claim(limit, with_acks=bool(acked), limited=limited), params)


def lock_queue_call(queries: Queries, *, queue_name: str) -> Call:
    """Serialise the claims of a limited queue until the transaction ends."""
    return Call(queries.lock_queue, {"queue_name": queue_name})


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claim returned: the jobs, and the queue's limit as the claim saw it."""

    jobs: list[ClaimedJob]
    concurrency_limit: int | None


def claimed_jobs(rows: Sequence[Row]) -> Claim:
    """The claim's rows: one per job (or one of NULLs), each ending with the limit."""
    jobs = [ClaimedJob(*row[:-1]) for row in rows if row[0] is not None]
    return Claim(jobs, rows[0][-1] if rows else None)


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
        queries_of(conn),
        queue_name=queue_name,
        limit=limit,
        owner=owner,
        lease_seconds=lease_seconds,
        acked=acked,
    )
    return claimed_jobs(call.rows(conn)).jobs


def mark_acked_call(queries: Queries, *, held: Sequence[tuple[UUID, int]]) -> Call:
    """Record early acks: from now a lost worker means failed, not requeue (rows changed)."""
    return Call(queries.mark_acked, held_params(held))


def requeue_call(
    queries: Queries, *, held: Sequence[tuple[UUID, int]], channel: str | None
) -> Call:
    """Put held jobs back in line; one row: (jobs moved, NOTIFYs)."""
    return Call(queries.requeue, {**held_params(held), "channel": channel})


def finish_call(
    queries: Queries,
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
    channel: str | None = None,
) -> Call:
    """Move a job to ``status`` and close its current attempt's log row.

    ``attempt`` fences the write to the delivery that ran it; ``None`` accepts any
    attempt (result-backend writes for tasks that arrived through another broker).
    ``None`` for ``result``, ``max_attempts`` or ``run_at`` leaves the column as it
    was. ``result_channel``: NOTIFY it with the job id when the row changed, in this
    same statement (the result backend's ready states). ``channel``: the workers', told
    when the job leaves ``running`` in a queue with a concurrency limit (a slot is
    free). One row: the rows changed.
    """
    return Call(
        queries.finish,
        {
            "job_id": job_id,
            "attempt": attempt,
            "status": status.value,
            "log_status": None if log_status is None else log_status.value,
            "result": None if result is None else Jsonb(result),
            "max_attempts": max_attempts,
            "run_at": run_at,
            # text columns refuse NUL and lone surrogates: such characters become escapes.
            "error_message": printable(error_message or "")[:255] or None,
            "log_message": printable(log_message) if log_message else log_message,
            "result_channel": result_channel,
            "channel": channel,
            # a success small enough rides in its notification (notify.result_note)
            "inline": (
                result_channel is not None and status is JobStatus.COMPLETED and result is not None
            ),
        },
    )


def heartbeat_call(
    queries: Queries, *, owner: str, job_ids: Sequence[UUID], lease_seconds: float
) -> Call:
    """Extend the leases ``owner`` still holds on ``job_ids`` (rows changed)."""
    return Call(queries.heartbeat, {"owner": owner, "ids": list(job_ids), "lease": lease_seconds})


def delete_held_call(queries: Queries, *, held: Sequence[tuple[UUID, int]]) -> Call:
    """Remove consumed messages that are not Celery tasks (rows deleted)."""
    return Call(queries.delete_held, held_params(held))
