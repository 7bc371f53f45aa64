"""celery-pgqueue: PostgreSQL as Celery's broker and result backend.

Importing the package registers the ``pgqueue://`` transport alias with Kombu and
batches Celery's groups, through the interpreter-start hook (:mod:`celery_pgqueue_hook`,
their one home): so both work where ``celery_pgqueue.pth`` did not run (``python -S``,
an install that skipped it).
"""

from __future__ import annotations

import celery_pgqueue_hook
from celery_pgqueue.errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionRejected,
    DatabaseNotFound,
    DatabaseUnavailable,
    InvalidPayload,
    InvalidQueueName,
    PayloadNotSerializable,
    PayloadTooLarge,
    PgQueueError,
    SchemaMissing,
    TransactionError,
    UniqueKeyContention,
    UnknownJob,
    UnknownQueue,
)

__version__ = "0.1.0"

TRANSPORT_PATH = celery_pgqueue_hook.TARGET


def register_transport() -> None:
    """Make ``pgqueue://`` resolve to our transport in this process (idempotent).

    Adds the alias now if Kombu is loaded, else as soon as it is (see the hook).
    """
    celery_pgqueue_hook.install()


register_transport()

__all__ = [
    "AuthenticationFailed",
    "ConfigurationError",
    "ConnectionRejected",
    "DatabaseNotFound",
    "DatabaseUnavailable",
    "InvalidPayload",
    "InvalidQueueName",
    "PayloadNotSerializable",
    "PayloadTooLarge",
    "PgQueueError",
    "SchemaMissing",
    "TransactionError",
    "UniqueKeyContention",
    "UnknownJob",
    "UnknownQueue",
    "__version__",
    "register_transport",
]
