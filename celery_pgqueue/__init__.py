"""celery-pgqueue: PostgreSQL as Celery's broker and result backend.

Importing the package registers the ``pgqueue://`` transport alias with Kombu.
"""

from __future__ import annotations

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
    UnknownJob,
    UnknownQueue,
)

__version__ = "0.1.0"

TRANSPORT_PATH = "celery_pgqueue.transport:Transport"


def register_transport() -> None:
    """Make ``pgqueue://`` resolve to our transport in this process (idempotent)."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES.setdefault("pgqueue", TRANSPORT_PATH)


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
    "UnknownJob",
    "UnknownQueue",
    "__version__",
    "register_transport",
]
