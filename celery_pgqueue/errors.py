"""Exceptions users catch.

Every error raised by celery-pgqueue derives from :class:`PgQueueError`; where a builtin
fits (``ValueError`` for bad configuration, ``ConnectionError`` for an unreachable
database) the class inherits it too, so ``except ValueError`` keeps working. Messages
name the value and the fix.
"""

from __future__ import annotations

from kombu.exceptions import EncodeError


class PgQueueError(Exception):
    """Root of every celery-pgqueue error."""


class ConfigurationError(PgQueueError, ValueError):
    """A URL or option is unknown, mistyped or out of range."""


class ConnectionRejected(ConfigurationError):
    """PostgreSQL (or libpq) refused this URL for a reason that retrying cannot fix.

    Not a connection error: ``.delay()`` raises it at once and a worker stops at
    start-up instead of reconnecting forever. ``sqlstate`` is the code the server sent
    (``None`` when libpq refused on its own, as for ``sslmode=require``).
    """

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class AuthenticationFailed(ConnectionRejected):
    """The login was refused: password (28P01), role or ``pg_hba.conf`` rule (28000)."""


class DatabaseNotFound(ConnectionRejected):
    """The URL's database does not exist on the server (3D000)."""


class PayloadTooLarge(PgQueueError, EncodeError, ValueError):  # type: ignore[misc]
    """A message or result is larger than ``max_payload_bytes``: the tier holds IDs, not blobs.

    Also Kombu's ``EncodeError``: a worker whose next chain step is refused fails that
    task (Celery's tracer treats it as a message it could not encode), and the failure
    reaches the rest of the chain.
    """


class CanvasTooLarge(PayloadTooLarge):
    """Celery's canvas bookkeeping in a message is larger than ``max_canvas_bytes``.

    The rest of a chain, chord and callback signatures ride in the message next to the
    task's own data; they have their own, larger cap than ``max_payload_bytes``.
    """


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


class UniqueKeyContention(PgQueueError, RuntimeError):
    """A unique publish saw its key change hands on every try (``Broker.enqueue_unique``)."""


MIGRATE_HINT = (
    "run `celery-pgqueue migrate --url <database url>` (or `celery -A proj pgqueue migrate`)"
)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (libpq's span several), else its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
