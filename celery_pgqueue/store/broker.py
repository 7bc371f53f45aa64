"""The broker's operations: enqueue, claim, ack, settle, heartbeat, rescue."""

from __future__ import annotations

from collections.abc import Sequence
from time import monotonic
from typing import Any
from uuid import UUID

import sqlalchemy as sa

from celery_pgqueue.errors import UniqueKeyContention
from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store import jobs as job_sql
from celery_pgqueue.store import lookups as lookup_sql
from celery_pgqueue.store import rescue as rescue_sql
from celery_pgqueue.store import retention as retention_sql
from celery_pgqueue.store import schema as schema_sql
from celery_pgqueue.store import uniqueness
from celery_pgqueue.store.hot import Call, Row
from celery_pgqueue.store.records import ClaimedJob, LiveJob, NewJob, due_now
from celery_pgqueue.store.routing import Routing
from celery_pgqueue.store.wakeups import Wakeups

UNIQUE_ATTEMPTS = 10
"""Times a unique publish is sent while its key's holder stays out of sight.

A miss means the holder committed after the statement's snapshot was taken: the next
statement sees it (or, had it finished meanwhile, inserts). Only a key changing hands
that fast, again and again, exhausts them."""


class Broker(Routing):
    """What the transport does with jobs, each call one short statement or transaction."""

    def enqueue(self, new_jobs: Sequence[NewJob], conn: sa.Connection | None = None) -> int:
        """Insert jobs in one statement; workers are woken when it commits."""
        if not new_jobs:
            return 0
        names = sorted({j.queue_name for j in new_jobs})
        self.ensure_queues(names, conn)
        channel = self.channel if self.options.use_notify else None
        if channel is not None and conn is None and all(map(due_now, new_jobs)):
            return self._enqueue_coalesced(new_jobs, names, channel)
        call = job_sql.insert_call(self.queries, new_jobs=new_jobs, channel=channel)
        row = self._write(call, names, conn)
        return int(row[0]) if row else 0

    def _enqueue_coalesced(self, new_jobs: Sequence[NewJob], names: list[str], channel: str) -> int:
        """Our own commit of jobs due now: it notifies unless this process just did.

        See :mod:`~celery_pgqueue.store.wakeups`: a NOTIFY in every publish's commit
        serialises the commits of every producer on the server.
        """
        wakeups = self.wakeups()
        notify = wakeups.notify_now(names)
        call = job_sql.insert_call(
            self.queries, new_jobs=new_jobs, channel=channel if notify else None
        )
        started = monotonic()
        try:
            row = self._write(call, names, None)
        except BaseException:
            # Owed, whether it was to notify or not: even a failure may have
            # committed (a lost reply), and a spare NOTIFY is harmless.
            wakeups.owe(names)
            raise
        if notify:
            wakeups.notified(monotonic() - started)
        else:
            wakeups.owe(names)
        return int(row[0]) if row else 0

    def wakeups(self) -> Wakeups:
        """This process's wake-up debts for this database (made on first use)."""
        pool = self.pool
        if pool.wakeups is None:
            with pool.lock:
                if pool.wakeups is None:
                    channel, hot = self.channel, self._hot

                    def wake(queues: list[str]) -> None:
                        hot.rows(job_sql.wake_call(channel, queues))

                    pool.wakeups = Wakeups(wake)
        return pool.wakeups

    def enqueue_unique(self, job: NewJob, conn: sa.Connection | None = None) -> LiveJob:
        """Insert ``job`` unless a queued or running job holds ``job.unique_key``.

        Returns the job that holds the key now: ``job`` itself when it was written (a
        re-published id, Celery's retry, is re-queued as :meth:`enqueue` does), else
        the holder. The partial unique index decides races, so producers racing on
        one key write one row.
        """
        channel = self.channel if self.options.use_notify else None
        self.ensure_queues([job.queue_name], conn)
        call = uniqueness.insert_unique_call(self.queries.schema, job=job, channel=channel)
        for _ in range(UNIQUE_ATTEMPTS):
            row = self._write(call, [job.queue_name], conn)
            if row is None or row[3] is None:
                continue
            if row[3] != job.id and row[5]:
                # The holder is past its expires: it will never run, yet would answer
                # every duplicate until a claim or maintenance met it. Settle it as
                # Celery would (REVOKED, "expired") and publish again.
                self.expire_tasks([row[3]], conn=conn)
                continue
            return LiveJob(id=row[3], task_id=None if row[3] == job.id else row[4])
        raise UniqueKeyContention(
            f"unique key {job.unique_key!r}: its holder changed {UNIQUE_ATTEMPTS} times "
            "while publishing; publish again"
        )

    def expire_tasks(
        self,
        job_ids: Sequence[UUID] | None = None,
        limit: int | None = None,
        conn: sa.Connection | None = None,
    ) -> int:
        """Record queued tasks past their ``expires`` as cancelled (REVOKED), one batch.

        ``job_ids``: only those (a client waiting on them, a unique task's holder);
        else any. Waiting ``get()`` calls are woken. ``conn``: in the caller's
        transaction.
        """
        results = self.result_channel if self.options.use_notify else None
        with self.single(conn) as c:
            return rescue_sql.expire_tasks(
                c,
                limit=limit or self.options.prune_batch_size,
                job_ids=job_ids,
                result_channel=results,
            )

    def _write(self, call: Call, names: list[str], conn: sa.Connection | None) -> Row | None:
        """Run an enqueue statement: on ``conn`` if given, else in autocommit."""
        if conn is not None:
            with self.single(conn) as c:
                return call.first(c)
        try:
            return self.first(call)
        except sa.exc.IntegrityError as exc:
            # A queue we remembered was dropped by another process: create it again.
            if "fk_jobs_queue_name" not in str(exc.orig):
                raise
            self._known_queues.difference_update(names)
            self.ensure_queues(names)
            return self.first(call)

    def claim(
        self,
        queue_name: str,
        limit: int,
        owner: str,
        acked: Sequence[tuple[UUID, int]] = (),
        drained: str | None = None,
    ) -> list[ClaimedJob]:
        """Take up to ``limit`` due jobs of an active queue under a lease for ``owner``.

        ``drained``: a note (``listener.claim_note_prefix``) the claim NOTIFYs at its
        commit, with when it began appended, if it takes fewer than ``limit`` (never
        for a limited queue, whose short claims say nothing of what is left); ignored
        when ``use_notify`` is off.

        ``acked`` deliveries are marked acked in the same statement. A queue with a
        concurrency limit gets no more than its free slots, under the queue's lock
        (:data:`~celery_pgqueue.store.queries.CLAIM_LIMITED`); any other queue keeps the
        one lock-free statement. Each claim says whether the queue is limited, so a
        limit set or removed applies from every worker's next claim.
        """
        limited = queue_name in self._limited_queues
        tell = drained if self.options.use_notify and not limited else None
        claim = self._claim(queue_name, limit, owner, acked, limited=limited, drained=tell)
        if claim.concurrency_limit is None:
            self._limited_queues.discard(queue_name)
        elif not limited:
            # Limited since our last claim, which is why this one took nothing (its
            # acks were recorded; sent again they change nothing): claim under the lock.
            self._limited_queues.add(queue_name)
            claim = self._claim(queue_name, limit, owner, acked, limited=True)
        return claim.jobs

    def is_limited(self, queue_name: str) -> bool:
        """Whether the last claim of ``queue_name`` found it with a concurrency limit."""
        return queue_name in self._limited_queues

    def _claim(
        self,
        queue_name: str,
        limit: int,
        owner: str,
        acked: Sequence[tuple[UUID, int]],
        *,
        limited: bool,
        drained: str | None = None,
    ) -> job_sql.Claim:
        call = job_sql.claim_call(
            self.queries,
            queue_name=queue_name,
            limit=limit,
            owner=owner,
            lease_seconds=self.options.lease_seconds,
            acked=acked,
            limited=limited,
            channel=self.channel if drained else None,
            drained=drained,
        )
        lock = job_sql.lock_queue_call(self.queries, queue_name=queue_name) if limited else None
        return job_sql.claimed_jobs(self.rows(call, after=lock))

    def tell_workers(self, payload: str) -> None:
        """One NOTIFY on the queues channel (a worker handing its turn to claim on)."""
        if self.options.use_notify:
            with self.single() as conn:
                schema_sql.notify(conn, channel=self.channel, payload=payload)

    def mark_acked(self, held: Sequence[tuple[UUID, int]]) -> int:
        """Record that these deliveries were acked before their task finished."""
        if not held:
            return 0
        return self.rowcount(job_sql.mark_acked_call(self.queries, held=held))

    def requeue(self, held: Sequence[tuple[UUID, int]]) -> int:
        """Put held deliveries back in line at once (reject/requeue, shutdown)."""
        if not held:
            return 0
        channel = self.channel if self.options.use_notify else None
        row = self.first(job_sql.requeue_call(self.queries, held=held, channel=channel))
        return int(row[0]) if row else 0

    def finish(
        self,
        job_id: UUID,
        *,
        attempt: int | None,
        status: JobStatus,
        log_status: LogStatus | None,
        error_message: str | None = None,
        log_message: str | None = None,
        result: Any = None,
        max_attempts: int | None = None,
        run_at: Any = None,
        conn: sa.Connection | None = None,
    ) -> bool:
        """Move one job to ``status``, closing its attempt; False if fenced out."""
        call = job_sql.finish_call(
            self.queries,
            job_id=job_id,
            attempt=attempt,
            status=status,
            log_status=log_status,
            error_message=error_message,
            log_message=log_message,
            result=result,
            max_attempts=max_attempts,
            run_at=run_at,
            channel=self.channel if self.options.use_notify else None,
        )
        if conn is not None:
            with self.single(conn) as c:
                row = call.first(c)
        else:
            row = self.first(call)
        return bool(row and row[0])

    def heartbeat(self, owner: str, job_ids: Sequence[UUID]) -> int:
        """Extend the leases ``owner`` holds on ``job_ids``."""
        if not job_ids:
            return 0
        call = job_sql.heartbeat_call(
            self.queries, owner=owner, job_ids=job_ids, lease_seconds=self.options.lease_seconds
        )
        return self.rowcount(call)

    def delete_held(self, held: Sequence[tuple[UUID, int]]) -> int:
        """Remove consumed messages that are not tasks."""
        if not held:
            return 0
        return self.rowcount(job_sql.delete_held_call(self.queries, held=held))

    def rescue_expired(
        self, limit: int = 1000, *, spare: tuple[str, Sequence[UUID]] | None = None
    ) -> tuple[int, int]:
        """Requeue (or fail, if acked early) running jobs whose lease ran out.

        ``spare``: ``(owner, job ids)`` the calling process still holds; never taken.
        """
        channel = self.channel if self.options.use_notify else None
        results = self.result_channel if self.options.use_notify else None
        with self.begin() as conn:
            return rescue_sql.rescue_expired(
                conn, limit=limit, channel=channel, result_channel=results, spare=spare
            )

    def purge(self, queue_name: str) -> int:
        """Delete a queue's waiting jobs."""
        with self.begin() as conn:
            return retention_sql.purge(conn, queue_name=queue_name)

    def count_waiting(self, queue_name: str) -> int:
        """Queued jobs in a queue, due or scheduled."""
        with self.begin() as conn:
            return lookup_sql.count_waiting(conn, queue_name=queue_name)

    def seconds_to_expiry(self, job_ids: Sequence[UUID]) -> dict[UUID, float]:
        """Seconds until each still-queued task of ``job_ids`` expires (database clock)."""
        with self.single() as conn:
            return rescue_sql.seconds_to_expiry(conn, job_ids=job_ids)

    def next_due(
        self, queue_names: Sequence[str], came_due_within: float = 0.0, tell: Sequence[str] = ()
    ) -> dict[str, tuple[float, float]]:
        """When the soonest scheduled job of each of these queues comes due: ``{queue:
        (seconds, run_at)}`` (``run_at`` on the database's clock), queues with none left
        out. ``came_due_within``: count jobs that came due that many seconds ago too (the
        answer is then negative): those a claim just before may have missed. The answers
        for the queues in ``tell`` are NOTIFYed to their other workers (transport/herd)."""
        channel = self.channel if tell and self.options.use_notify else None
        with self.single() as conn:
            return lookup_sql.next_due(
                conn,
                queue_names=queue_names,
                came_due_within=came_due_within,
                tell=tell,
                channel=channel,
            )
