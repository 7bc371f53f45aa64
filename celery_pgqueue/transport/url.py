"""The connection string and options as Kombu hands them over, and as logs show them.

The transport sets ``can_parse_url``: Kombu passes ``pgqueue://…`` whole in
``client.hostname``, query string (libpq parameters) included. Options come from
``transport_options`` and are checked once, by :class:`PgQueueOptions`.
"""

from __future__ import annotations

from typing import Any

from celery_pgqueue.errors import ConfigurationError
from celery_pgqueue.options import DatabaseURL, PgQueueOptions, mask_password

DEFAULT_PORT = 5432


def client_options(client: Any) -> PgQueueOptions:
    """The connection's ``transport_options``, parsed (unknown keys are refused)."""
    return PgQueueOptions.parse(client.transport_options)


def client_url(client: Any) -> DatabaseURL:
    """The database a Kombu connection names.

    With ``can_parse_url`` Kombu leaves the port unset; it is set on ``client`` here
    so ``celery report`` shows the real one.
    """
    raw = client.hostname or ""
    if "://" in raw:
        url = DatabaseURL.parse(raw)
        client.port = client.port or url.port or DEFAULT_PORT
        return url
    # Kombu's failover (Connection.switch) hands alternates over parsed.
    return DatabaseURL(
        host=raw or None,
        port=client.port,
        user=client.userid,
        password=client.password,
        database=(client.virtual_host or "").strip("/") or None,
    )


def shown_uri(uri: str, include_password: bool = False) -> str:
    """The URL for ``celery report`` and logs: password masked unless asked."""
    try:
        parsed = DatabaseURL.parse(uri)
    except ConfigurationError:
        return mask_password(uri)
    if include_password:
        return uri
    return parsed.masked()
