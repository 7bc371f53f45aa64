"""``celery beat`` with its state in PostgreSQL, safe to run in several processes.

``celery -A proj beat -S celery_pgqueue.beat:Scheduler`` (or ``-S pgqueue``) keeps the
schedule in ``job_schedules``: each entry of ``beat_schedule`` is synced into it when
beat starts, and ``last_run_at`` is written with every tick, so a restarted beat
neither repeats a tick nor forgets one that fell due while it was down (it sends that
one once, as Celery's own persistent scheduler does).

Any number of beat processes may run at once. One of them holds the schedule's row in
``job_beat_leases`` and sends; the others check every tenth of the lease whether it
lapsed, and the first to see that takes over. Every send is one transaction that
renews the lease only if its fence is unchanged and advances the entry only from the
``last_run_at`` the leader read; with the pgqueue broker on the same database the
task's ``jobs`` row is inserted in that transaction too (``enqueue_in``), so a tick is
sent exactly once even when a paused or partitioned old leader wakes up. With another
broker the tick is recorded first and published after the commit: at most once (a
crash between the two loses that tick, as with Celery's own scheduler).

Time is the database's: the leader measures the offset of PostgreSQL's clock from its
own at each lease renewal and judges due-ness by it, so beats on machines whose clocks
disagree still send on one timeline, and ``last_run_at`` compares with ``now()``.

Settings: :mod:`celery_pgqueue.beat.settings`.
"""

from __future__ import annotations

from celery_pgqueue.beat.scheduler import Scheduler
from celery_pgqueue.beat.settings import BeatSettings

__all__ = ["BeatSettings", "Scheduler"]
