"""The one data-access layer: every statement celery-pgqueue runs goes through here.

:class:`Store` is composed of roles over one connection core; see
:mod:`celery_pgqueue.store.facade` for which module holds what. Driver errors become
:mod:`celery_pgqueue.errors` in :mod:`celery_pgqueue.store.connection`, once.
"""

from __future__ import annotations

from celery_pgqueue.store.facade import Store
from celery_pgqueue.store.pool import Pool
from celery_pgqueue.store.records import (
    AttemptRecord,
    ClaimedJob,
    JobRecord,
    NewJob,
    PruneCounts,
)
from celery_pgqueue.store.refusal import connection_failure

__all__ = [
    "AttemptRecord",
    "ClaimedJob",
    "JobRecord",
    "NewJob",
    "Pool",
    "PruneCounts",
    "Store",
    "connection_failure",
]
