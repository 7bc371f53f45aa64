"""Orphan rescue and bounded retention, run by workers themselves (no beat needed).

Every worker calls :func:`run_once` every ``maintenance_interval`` seconds; a session
advisory lock lets one process at a time do the work, so adding workers adds no
contention, only one cheap ``pg_try_advisory_lock`` each. A pass:

1. rescues running jobs whose lease ran out (their worker died or hung), and adds
   the rescues and newly finished jobs to the metrics' totals (``job_counters``);
2. records tasks still queued past their ``expires`` as cancelled (Celery's REVOKED,
   with a log row), and drops waiting transient messages past their TTL;
3. drops queues past their ``x-expires`` with their waiting messages;
4. prunes finished jobs and ``job_logs`` past retention, in short batches.

Each step is index-backed and runs in batches of ``prune_batch_size``, each its own
short transaction, so it never holds locks or a snapshot for long; with nothing to
do a pass is a handful of index probes. A pass stops after ``time_budget`` seconds
and the next one carries on: the caller's thread also renews leases, and a long
backlog (say, after retention was shortened) must not starve it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from celery_pgqueue.store import PruneCounts, Store
from celery_pgqueue.store import metrics as counters

LOCK_PURPOSE = "maintenance"


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    """What one pass did. ``ran`` is False when another process held the lock."""

    ran: bool
    rescued: int = 0
    """Running jobs with an expired lease put back in line."""
    rescued_failed: int = 0
    """Running jobs with an expired lease marked failed (acked early, or out of attempts)."""
    expired_messages: int = 0
    """Waiting messages deleted: past their TTL, or in a queue that expired."""
    expired_tasks: int = 0
    """Queued tasks past their ``expires`` recorded as cancelled (REVOKED)."""
    expired_queues: int = 0
    """Queues past their ``x-expires`` deleted (bindings by cascade)."""
    pruned: PruneCounts = field(default_factory=PruneCounts)
    """Finished jobs and log rows deleted by retention."""
    finished: bool = True
    """False when the time budget ran out with work left for the next pass."""
    seconds: float = 0.0


def run_once(
    store: Store,
    *,
    completed_retention: float,
    time_budget: float | None = None,
    spare: Callable[[], tuple[str, Sequence[UUID]]] | None = None,
) -> MaintenanceReport:
    """One maintenance pass, unless another process is running one right now.

    ``completed_retention`` is seconds to keep completed and cancelled jobs (the
    caller resolves ``completed_retention`` or Celery's ``result_expires``); failed
    jobs and logs follow the store's options. ``time_budget`` defaults to the smaller
    of ``maintenance_interval`` and a third of ``lease_seconds``. ``spare``: called once
    the lock is held, returns ``(owner, job ids)`` the calling process still holds, which
    rescue leaves alone (see ``leases.py``).
    """
    opts = store.options
    budget = (
        time_budget
        if time_budget is not None
        else min(opts.maintenance_interval, opts.lease_seconds / 3)
    )
    started = time.monotonic()
    deadline = started + budget
    batch = opts.prune_batch_size
    with store.advisory_lock(LOCK_PURPOSE) as held:
        if not held:
            return MaintenanceReport(ran=False)
        rescued = rescued_failed = messages = queues = tasks = 0
        pruned = PruneCounts()
        finished = False
        ours = spare() if spare is not None else None
        while True:
            requeued, failed = store.rescue_expired(limit=batch, spare=ours)
            rescued, rescued_failed = rescued + requeued, rescued_failed + failed
            if requeued + failed < batch or time.monotonic() >= deadline:
                break
        # Totals for the metrics: rescues now, finished jobs before retention prunes them.
        counters.count_rescues(store, requeued=rescued, failed=rescued_failed)
        counters.fold(store)
        while time.monotonic() < deadline:
            n = store.expire_tasks(limit=batch)
            tasks += n
            if n < batch:
                break
        while time.monotonic() < deadline:
            n = store.drop_expired_messages(limit=batch)
            messages += n
            if n < batch:
                break
        while time.monotonic() < deadline:
            dropped, n = store.drop_expired_queues(limit=batch)
            queues, messages = queues + dropped, messages + n
            if dropped < batch and n < batch:
                break
        while time.monotonic() < deadline:
            # One batch of each kind per round, so one kind's backlog can't starve the rest.
            step = store.prune(completed_retention=completed_retention, max_batches=1)
            pruned = _add(pruned, step)
            if max(step.completed, step.cancelled, step.failed, step.logs) < batch:
                finished = True
                break
    return MaintenanceReport(
        ran=True,
        rescued=rescued,
        rescued_failed=rescued_failed,
        expired_messages=messages,
        expired_tasks=tasks,
        expired_queues=queues,
        pruned=pruned,
        finished=finished,
        seconds=round(time.monotonic() - started, 3),
    )


def _add(a: PruneCounts, b: PruneCounts) -> PruneCounts:
    return PruneCounts(
        completed=a.completed + b.completed,
        cancelled=a.cancelled + b.cancelled,
        failed=a.failed + b.failed,
        logs=a.logs + b.logs,
    )
