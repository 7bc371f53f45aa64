"""Moved to :mod:`celery_pgqueue.transport.leases`; this name is the same module.

Kept so ``celery_pgqueue.leases`` (and its ``LeaseKeeper``) still imports: the entry in
``sys.modules`` is the module itself, not a copy, so state and patches are shared.
"""

from __future__ import annotations

import sys

from celery_pgqueue.transport import leases

sys.modules[__name__] = leases
