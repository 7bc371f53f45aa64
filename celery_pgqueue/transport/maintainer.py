"""The maintenance runner: one background thread per consuming connection.

Started with the lease keeper by the first consume (:meth:`Maintainer.start`), in
event-loop and synchronous consumers alike. Every beat it writes the deferred acks
that no claim carried (:mod:`.acks`); every ``maintenance_interval`` it asks for the
maintenance turn and, if it got it, runs a pass of orphan rescue and retention
(:mod:`celery_pgqueue.maintenance`): one pass per period across all workers.
Lease renewal has a thread and a connection of its own (:mod:`.leases`), so neither a
long maintenance pass nor an exhausted pool can delay a renewal.
"""

from __future__ import annotations

import logging
import threading
from time import monotonic
from typing import TYPE_CHECKING, Any

from celery_pgqueue import maintenance
from celery_pgqueue.options import completed_retention
from celery_pgqueue.store import Store
from celery_pgqueue.transport.leases import LeaseKeeper

if TYPE_CHECKING:
    from celery_pgqueue.transport.transport import Transport

logger = logging.getLogger("celery_pgqueue")

TURN = "maintenance"
"""The ``store.take_turn`` purpose of the workers' maintenance passes."""
TURN_SHARE = 0.9
"""A turn lasts this share of ``maintenance_interval``."""


class Maintainer:
    """The background thread of one connection, and its link to the lease keeper."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.after_fork_in_child()

    def after_fork_in_child(self) -> None:
        """The parent's threads did not survive the fork: nothing runs, nothing attached."""
        self.thread: threading.Thread | None = None
        self.keeper: LeaseKeeper | None = None

    def start(self) -> None:
        """Attach to the process's lease keeper; start the thread (both idempotent)."""
        transport = self.transport
        store = transport.store
        if self.keeper is None or self.keeper.store is not store:
            self.keeper = LeaseKeeper.for_store(store)
        self.keeper.attach(transport)
        if self.thread is not None and self.thread.is_alive():
            return
        transport.stopping.clear()
        self.thread = threading.Thread(target=self._run, name="pgqueue-maintenance", daemon=True)
        self.thread.start()

    def detach(self) -> None:
        """Stop renewing for this connection (it is closing)."""
        if self.keeper is not None:
            self.keeper.detach(self.transport)

    def _run(self) -> None:
        transport = self.transport
        options = transport.options
        interval = options.maintenance_interval
        beat = min(max(0.2, options.lease_seconds / 3), interval)
        last_maintenance = 0.0
        while not transport.stopping.wait(beat):
            try:
                transport.acks.flush()
            except Exception as exc:  # the consumer sees connection errors itself
                logger.warning("pgqueue could not write deferred acks (retried next beat): %s", exc)
            if monotonic() - last_maintenance >= interval:
                last_maintenance = monotonic()
                try:
                    # One worker per period, whoever asks first after the turn is due:
                    # a pass in every worker (24 workers, 24 passes) was most of an
                    # idle worker's load. A turn a little shorter than the period, so
                    # a lone worker's next ask (one period later) always finds it due.
                    if transport.store.take_turn(TURN, interval * TURN_SHARE):
                        run_maintenance(transport.store, keeper=self.keeper)
                except Exception as exc:
                    logger.warning("pgqueue maintenance failed (retried next pass): %s", exc)


def run_maintenance(store: Store, *, keeper: LeaseKeeper | None = None) -> None:
    """Orphan rescue and retention, one process at a time (see maintenance.py).

    With this process's ``keeper``, its leases are renewed first if due and the jobs
    it holds are spared: after a stall (a C call holding the GIL) every thread wakes
    at once, and its own rescue must not take back the jobs it is still running only
    because their renewal has not run yet.
    """
    retention = completed_retention(store.options, _result_expires())
    spare = keeper.before_rescue if keeper is not None else None
    maintenance.run_once(store, completed_retention=retention, spare=spare)


def _result_expires() -> Any:
    """The worker's ``result_expires`` (Celery's current app: the worker's own)."""
    from celery import current_app

    return current_app.conf.result_expires
