"""The result backend's operations: task states, groups and chords."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from celery_pgqueue.store import batches, result_reads
from celery_pgqueue.store import groups as group_sql
from celery_pgqueue.store import jobs as job_sql
from celery_pgqueue.store import results as result_sql
from celery_pgqueue.store import schema as schema_sql
from celery_pgqueue.store.batches import Finish
from celery_pgqueue.store.groups import ChordPart
from celery_pgqueue.store.notify import ResultListener
from celery_pgqueue.store.results import StateWrite, StoredResult
from celery_pgqueue.store.routing import Routing


class Outcomes(Routing):
    """Celery's result backend: task state in the job's own row, attempts in job_logs,
    groups and chord counters in job_groups. Each method is one autocommit statement."""

    def write_state(self, write: StateWrite, *, notify: bool) -> bool:
        """Record one state transition of a task; False when fenced out.

        A row the pgqueue transport made is updated only at the attempt it delivered
        (:data:`queries.FINISH`); otherwise the row and its attempt's log row are created
        or updated here; either way in one statement. ``notify`` and a ready state:
        waiting clients are woken by a NOTIFY on :attr:`result_channel` sent by that
        statement, so it fires at its commit and only if the row changed.
        """
        if write.transport_owned:
            return self._finish(
                job_id=write.job_id,
                attempt=write.attempt,
                status=write.status,
                log_status=write.log_status,
                error_message=write.error_message,
                log_message=write.log_message,
                result=write.document,
                max_attempts=write.max_attempts,
                notify_result=notify and write.ready,
            )
        self.ensure_queues([write.queue_name])
        with self.single() as conn:
            return result_sql.upsert_state(
                conn, write=write, channel=self.result_channel if notify else None
            )

    def finish_many(self, finishes: Sequence[Finish], *, notify: bool) -> set[UUID]:
        """Record the finish writes of many transport-owned tasks in one statement.

        The batched :meth:`write_state` of a completion writer: each row fenced by its
        attempt exactly as alone. Returns the ids whose row changed (the others were
        fenced out). One job id at most once per call.
        """
        if not finishes:
            return set()
        if len(finishes) == 1:
            # A lone finish (a quiet node): FINISH itself costs half of FINISH_MANY.
            f = finishes[0]
            changed = self._finish(
                job_id=f.job_id,
                attempt=f.attempt,
                status=f.status,
                log_status=f.log_status,
                error_message=f.error_message,
                log_message=f.log_message,
                result=f.result,
                max_attempts=f.max_attempts,
                notify_result=notify and f.notify,
            )
            return {f.job_id} if changed else set()
        row = self.first(
            batches.finish_many_call(
                self.options.schema,
                finishes,
                result_channel=self.result_channel if notify else None,
                channel=self.channel if self.options.use_notify else None,
            )
        )
        return set(row[3] or ()) if row else set()

    def write_unrun_states(self, writes: Sequence[StateWrite], *, notify: bool) -> int:
        """Record one state for many tasks that never ran, in one statement; rows written.

        For the tasks a failed chain never published (a later group's, say): no
        attempt and no transport row to fence on, so each gets (or keeps) its own row.
        A group of any size is one round trip and one commit.
        """
        if not writes:
            return 0
        statuses = {w.status for w in writes}
        if len(statuses) != 1 or any(w.transport_owned or w.attempt is not None for w in writes):
            raise ValueError("write_unrun_states takes one state of tasks that never ran")
        self.ensure_queues(sorted({w.queue_name for w in writes}))
        with self.single() as conn:
            return result_sql.upsert_unrun(
                conn,
                status=statuses.pop(),
                writes=writes,
                channel=self.result_channel if notify else None,
            )

    def read_results(
        self,
        job_ids: Sequence[UUID],
        *,
        ready_only: bool = False,
        with_payload: bool = False,
        with_failure_log: bool = False,
    ) -> list[StoredResult]:
        """The stored state of several tasks in one round trip; unknown ids are absent."""
        with self.single() as conn:
            return result_reads.read(
                conn,
                job_ids=job_ids,
                ready_only=ready_only,
                with_payload=with_payload,
                with_failure_log=with_failure_log,
            )

    def notify_results(self, payload: str) -> None:
        """Send one NOTIFY on the results channel (the listener's self-probe)."""
        with self.single() as conn:
            schema_sql.notify(conn, channel=self.result_channel, payload=payload)

    def result_listener(self) -> ResultListener:
        """The process's LISTEN connection for results (one, whatever the waiters)."""
        return ResultListener.shared(
            self.url,
            self.result_channel,
            connect_timeout=self.options.connect_timeout,
            probe=self.notify_results,
        )

    def save_group(self, group_id: UUID, result: Any) -> None:
        """Store a group's result tuple (a JSON value)."""
        with self.single() as conn:
            group_sql.save(conn, group_id=group_id, result=result)

    def group(self, group_id: UUID) -> str | None:
        """A saved group's result tuple as JSON text, or None."""
        with self.single() as conn:
            return group_sql.get(conn, group_id=group_id)

    def delete_group(self, group_id: UUID) -> int:
        """Remove a group with its chord counter and parts."""
        with self.single() as conn:
            return group_sql.delete(conn, group_id=group_id)

    def set_chord_size(self, group_id: UUID, size: int) -> None:
        """How many header parts the chord on ``group_id`` waits for."""
        with self.single() as conn:
            group_sql.set_chord_size(conn, group_id=group_id, size=size)

    def add_to_chord(self, group_id: UUID, count: int = 1) -> None:
        """Wait for ``count`` more header parts."""
        with self.single() as conn:
            group_sql.add_to_chord(conn, group_id=group_id, count=count)

    def count_chord_part(
        self, group_id: UUID, task_id: UUID, group_index: int | None, state: str
    ) -> bool:
        """Count one finished header part; True for the one caller that must start the body."""
        with self.single() as conn:
            return group_sql.count_part(
                conn, group_id=group_id, task_id=task_id, group_index=group_index, state=state
            )

    def chord_parts(self, group_id: UUID) -> list[ChordPart]:
        """The counted parts of a chord in header order, with their stored results."""
        with self.single() as conn:
            return group_sql.parts(conn, group_id=group_id)

    def forget_chord_parts(self, group_id: UUID) -> int:
        """Drop a started chord's parts; its group row stays as the "started" marker."""
        with self.single() as conn:
            return group_sql.forget_parts(conn, group_id=group_id)

    def prune_groups(self, *, older_than: float, max_batches: int = 10_000) -> int:
        """Delete groups untouched for ``older_than`` seconds, in short batches."""
        batch = self.options.prune_batch_size
        return self._drain(
            lambda c: group_sql.prune(c, older_than=older_than, limit=batch),
            batch,
            False,
            max_batches,
        )

    def _finish(self, *, notify_result: bool, **fields: Any) -> bool:
        """One transport-owned finish (FINISH); True if the fenced row changed."""
        row = self.first(
            job_sql.finish_call(
                self.queries,
                result_channel=self.result_channel if notify_result else None,
                channel=self.channel if self.options.use_notify else None,
                **fields,
            )
        )
        return bool(row and row[0])
