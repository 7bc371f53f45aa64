"""Administration: status, find, cancel, retry, prune, and maintenance's passes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import datetime
from uuid import UUID

import sqlalchemy as sa

from celery_pgqueue.states import JobStatus
from celery_pgqueue.store import locks as lock_sql
from celery_pgqueue.store import logs as log_sql
from celery_pgqueue.store import lookups as lookup_sql
from celery_pgqueue.store import queues as queue_sql
from celery_pgqueue.store import rescue as rescue_sql
from celery_pgqueue.store import retention as retention_sql
from celery_pgqueue.store import views as view_sql
from celery_pgqueue.store.records import (
    AttemptRecord,
    JobRecord,
    PruneCounts,
    QueueStatus,
    RunningJob,
)
from celery_pgqueue.store.routing import Routing


class Admin(Routing):
    """What operators (the CLI) and maintenance do: reports, repairs, retention."""

    def cancel(self, job_ids: Sequence[UUID], *, revoked: bool = False) -> int:
        """Durably cancel jobs that have not started; waiting ``get()`` calls wake up.

        ``revoked``: Celery's ``revoke()`` asked, so workers remember these ids too.
        """
        results = self.result_channel if self.options.use_notify else None
        reason = rescue_sql.REVOKED_MESSAGE if revoked else None
        with self.begin() as conn:
            return rescue_sql.cancel(conn, job_ids=job_ids, result_channel=results, reason=reason)

    def revoked_jobs(self, job_ids: Sequence[UUID]) -> dict[UUID, str]:
        """Which of these cancelled jobs Celery revoked, or expired: ``id -> why``.

        Workers keep revoked (and expired) task ids and drop such a message on sight,
        so putting one back in line would only see it cancelled again.
        """
        with self.begin() as conn:
            rows = rescue_sql.cancel_reasons(conn, job_ids=job_ids)
        found: dict[UUID, str] = {}
        for job_id, error, last_log in rows:
            for text in (last_log, error):
                if text in ("revoked", "expired"):
                    found[job_id] = text
                elif text and text.startswith("TaskRevokedError"):
                    found[job_id] = "expired" if "expired" in text else "revoked"
                else:
                    continue
                break
        return found

    def job_ids_with_prefix(self, prefix: str, limit: int = 10) -> list[UUID]:
        """Up to ``limit`` job ids starting with ``prefix`` (hex digits, dashes ignored)."""
        digits = prefix.replace("-", "").lower()
        low = UUID(digits.ljust(32, "0"))
        high = UUID(digits.ljust(32, "f"))
        with self.begin() as conn:
            return lookup_sql.ids_between(conn, low=low, high=high, limit=limit)

    def retry(self, job_ids: Sequence[UUID]) -> int:
        """Failed or cancelled jobs back to queued now."""
        channel = self.channel if self.options.use_notify else None
        with self.begin() as conn:
            return rescue_sql.retry(conn, job_ids=job_ids, channel=channel)

    def delete(self, job_ids: Sequence[UUID]) -> int:
        """Remove jobs and their logs."""
        with self.begin() as conn:
            return retention_sql.delete(conn, job_ids=job_ids)

    def job(self, job_id: UUID) -> JobRecord | None:
        """One job, or None."""
        with self.begin() as conn:
            row = lookup_sql.get(conn, job_id=job_id)
        return JobRecord(**row) if row else None

    def attempts(self, job_id: UUID) -> list[AttemptRecord]:
        """A job's ``job_logs`` rows, oldest first."""
        with self.begin() as conn:
            rows = log_sql.for_job(conn, job_id=job_id)
        return [AttemptRecord(*row) for row in rows]  # type: ignore[call-arg]

    # -- retention ------------------------------------------------------------------

    def prune(
        self, *, completed_retention: float, dry_run: bool = False, max_batches: int = 10_000
    ) -> PruneCounts:
        """Delete expired finished jobs and old logs in short batches."""
        if dry_run:
            return self.prunable(completed_retention=completed_retention)
        opts = self.options
        batch = opts.prune_batch_size
        plan = (
            ("completed", JobStatus.COMPLETED, completed_retention),
            ("cancelled", JobStatus.CANCELLED, completed_retention),
            ("failed", JobStatus.FAILED, opts.failed_retention),
        )
        totals: dict[str, int] = {}
        for name, status, older_than in plan:
            totals[name] = self._drain(
                lambda c, s=status, o=older_than: retention_sql.prune_finished(
                    c, status=s, older_than=o, limit=batch, dry_run=dry_run
                ),
                batch,
                dry_run,
                max_batches,
            )
        totals["logs"] = self._drain(
            lambda c: log_sql.prune_old(
                c, older_than=opts.log_retention, limit=batch, dry_run=dry_run
            ),
            batch,
            dry_run,
            max_batches,
        ) + self._drain(
            lambda c: log_sql.prune_excess(
                c, keep=opts.max_logs_per_job, limit=batch, dry_run=dry_run
            ),
            batch,
            dry_run,
            max_batches,
        )
        return PruneCounts(**totals)

    # -- operations (CLI, maintenance) ----------------------------------------------

    def queue_status(self, *, include_transient: bool = False) -> list[QueueStatus]:
        """Every queue's depth, ages and throughput, read from the operator views.

        Queues with an expiry (Celery's mailboxes and reply queues) are left out unless
        ``include_transient``.
        """
        with self.begin() as conn:
            rows = view_sql.queue_status(conn, include_transient=include_transient)
        return [QueueStatus(**row) for row in rows]

    def running_jobs(self, limit: int = 20) -> list[RunningJob]:
        """Running jobs with their lease, longest running first (view ``job_running``)."""
        with self.begin() as conn:
            return [RunningJob(**row) for row in view_sql.running(conn, limit=limit)]

    def find_jobs(
        self,
        *,
        queues: Sequence[str] = (),
        statuses: Sequence[JobStatus] = (),
        task: str | None = None,
        changed_within: float | None = None,
        changed_since: datetime | None = None,
        scheduled: bool = False,
        limit: int = 50,
    ) -> list[JobRecord]:
        """Jobs matching every filter given, most recently changed first.

        ``scheduled``: only waiting jobs not due yet, soonest first.
        """
        with self.begin() as conn:
            rows = lookup_sql.find(
                conn,
                queues=queues,
                statuses=statuses,
                task=task,
                changed_within=changed_within,
                changed_since=changed_since,
                scheduled=scheduled,
                limit=limit,
            )
        return [JobRecord(**row) for row in rows]

    def job_statuses(self, job_ids: Sequence[UUID]) -> dict[UUID, str]:
        """The status of each id that exists; unknown ids are absent."""
        with self.begin() as conn:
            return lookup_sql.statuses(conn, job_ids=job_ids)

    def prunable(self, *, completed_retention: float) -> PruneCounts:
        """Exactly what :meth:`prune` would delete now, not capped at one batch."""
        opts = self.options
        with self.begin() as conn:
            jobs = {
                name: retention_sql.count_prunable(conn, status=status, older_than=older_than)
                for name, status, older_than in (
                    ("completed", JobStatus.COMPLETED, completed_retention),
                    ("cancelled", JobStatus.CANCELLED, completed_retention),
                    ("failed", JobStatus.FAILED, opts.failed_retention),
                )
            }
            logs = log_sql.count_prunable(
                conn,
                older_than=opts.log_retention,
                keep=opts.max_logs_per_job,
                doomed_jobs=retention_sql.is_prunable(
                    completed_retention=completed_retention,
                    failed_retention=opts.failed_retention,
                ),
            )
        return PruneCounts(logs=logs, **jobs)

    def drop_expired_messages(self, limit: int | None = None) -> int:
        """Delete waiting transient messages whose TTL has passed (one batch)."""
        with self.begin() as conn:
            return retention_sql.drop_expired(conn, limit=limit or self.options.prune_batch_size)

    def drop_expired_queues(self, limit: int | None = None) -> tuple[int, int]:
        """Drop queues past their ``x-expires`` with their waiting messages (one batch).

        Returns (queues, messages). A queue that still has running or finished jobs
        stays until retention has removed them.
        """
        batch = limit or self.options.prune_batch_size
        with self.begin() as conn:
            expired = queue_sql.expired(conn, limit=batch)
            if not expired:  # the usual pass: one look at the small job_queues table
                return 0, 0
            messages = 0
            for name in expired:
                messages += retention_sql.drop_waiting(conn, queue_name=name, limit=batch)
            names = queue_sql.drop_expired(conn, limit=batch)
        self._known_queues.difference_update(names)
        return len(names), messages

    def take_turn(self, purpose: str, seconds: float) -> bool:
        """Whether it is this caller's turn for ``purpose`` (then the next one is due in
        ``seconds``); one short transaction either way (see ``locks.take_turn``)."""
        with self.begin() as conn:
            return lock_sql.take_turn(conn, purpose=purpose, seconds=seconds)

    @contextlib.contextmanager
    def advisory_lock(self, purpose: str) -> Iterator[bool]:
        """Hold an advisory lock for ``purpose`` in this schema, if it is free.

        Yields whether this process got it; the caller does the work only then. The
        lock belongs to a transaction kept open on a pooled connection for the block
        (the work itself uses other connections, in short transactions); the
        rollback at the end releases it, even behind PgBouncer (see ``locks.py``).
        """
        key = lock_sql.key_for(purpose, self.options.schema)
        with self.translating():
            conn = self.engine.connect()
            try:
                conn.begin()
                held = lock_sql.try_lock(conn, key=key)
            except BaseException:
                conn.close()
                raise
        try:
            yield held
        finally:
            # Closing rolls the transaction back, which releases the lock. If that fails
            # the connection broke, and the server ended the session and its lock.
            with contextlib.suppress(sa.exc.DBAPIError):
                conn.close()
