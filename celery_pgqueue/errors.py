"""Exceptions users catch.

Every error raised by celery-pgqueue derives from :class:`PgQueueError`; where a builtin
fits (``ValueError`` for bad configuration, ``ConnectionError`` for an unreachable
database) the class inherits it too, so ``except ValueError`` keeps working. Messages
name the value and the fix.
"""

from __future__ import annotations


class PgQueueError(Exception):
    """Root of every celery-pgqueue error."""


class ConfigurationError(PgQueueError, ValueError):
    """A URL or option is unknown, mistyped or out of range."""


class AuthenticationFailed(ConfigurationError):
    """PostgreSQL refused the URL's user name or password.

    Not a connection error: retrying cannot help, so ``.delay()`` raises it at once and
    a worker stops at start-up instead of reconnecting forever.
    """


class PayloadTooLarge(PgQueueError, ValueError):
    """A message or result is larger than ``max_payload_bytes``: the tier holds IDs, not blobs."""


class PayloadNotSerializable(PgQueueError, TypeError):
    """A message or result cannot be encoded as JSON for the ``payload``/``result`` column."""


class InvalidPayload(PgQueueError, ValueError):
    """A ``jobs.payload`` is not a message a worker can take (edited by hand, say).

    The worker marks such a row failed with this message and carries on with the rest.
    """


class InvalidQueueName(PgQueueError, ValueError):
    """A queue name does not fit ``job_queues.name`` (1 to 100 characters, no NUL)."""


class DatabaseUnavailable(PgQueueError, ConnectionError):
    """PostgreSQL could not be reached or dropped the connection; safe to retry."""


class SchemaMissing(PgQueueError, RuntimeError):
    """The tier's tables are missing or older than this version: run the migrate command."""


class UnknownQueue(PgQueueError, LookupError):
    """No ``job_queues`` row has that name."""


class UnknownJob(PgQueueError, LookupError):
    """No ``jobs`` row has that id."""


class UnknownScheduleEntry(PgQueueError, LookupError):
    """No periodic task entry (``job_schedules`` row) has that name."""


class TransactionError(PgQueueError, RuntimeError):
    """Enqueue-in-transaction was used with a closed transaction or another database."""


MIGRATE_HINT = (
    "run `celery-pgqueue migrate --url <database url>` (or `celery -A proj pgqueue migrate`)"
)
