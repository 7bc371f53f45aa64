"""Every tunable in one typed, frozen object, validated once.

Transport and backend take the same options (``broker_transport_options`` and
``result_backend_transport_options``), so one mapping describes both. Unknown keys are
refused with a close-match hint: a mistyped option that silently did nothing is the
kind of bug that surfaces months later. Durations are seconds as ``float``.
"""

from __future__ import annotations

import difflib
import functools
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from celery_pgqueue.errors import ConfigurationError

# Keys kombu adds to transport options for its own connection-retry policy.
KOMBU_RETRY_KEYS = frozenset(
    {
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "retry_errors",
        "callback",
        "errback",
        "confirm_publish",
        "visibility_timeout",
    }
)

# Options of the connection pool itself. The broker and the result backend of one
# database share one pool per process, so these must be equal for both; every other
# option belongs to the role (broker or backend) that names it.
POOL_OPTIONS = (
    "pool_size",
    "max_overflow",
    "pool_timeout",
    "connect_timeout",
    "prepared_statements",
)


def pool_conflict(first: PgQueueOptions, second: PgQueueOptions) -> tuple[str, Any, Any] | None:
    """The first pool option on which two roles' options differ: (name, first's, second's)."""
    for name in POOL_OPTIONS:
        if getattr(first, name) != getattr(second, name):
            return name, getattr(first, name), getattr(second, name)
    return None


URL_SCHEMES = ("pgqueue", "postgresql", "postgres", "postgresql+psycopg")

#: PostgreSQL's longest identifier, in bytes: a longer name is silently truncated.
IDENTIFIER_BYTES = 63


@dataclass(frozen=True, slots=True)
class PgQueueOptions:
    """Options shared by the transport, the result backend and the CLI."""

    schema: str = "public"
    """PostgreSQL schema holding the tier tables (must be migrated there)."""
    polling_interval: float = 1.0
    """Seconds between claims when no NOTIFY arrives (the only wake-up when use_notify is off)."""
    use_notify: bool = True
    """LISTEN/NOTIFY wake-ups; turn off behind PgBouncer in transaction pooling mode."""
    max_payload_bytes: int = 65_536
    """Largest message or result accepted; the tier carries ids and small config."""
    max_canvas_bytes: int = 1_048_576
    """Largest part of a message (or result) that is Celery's canvas bookkeeping: the rest
    of a chain, chord and callback signatures (a result's children); not counted in
    max_payload_bytes."""
    lease_seconds: float = 20.0
    """How long a claimed job stays ours without a heartbeat before rescue takes it back
    (renewed every third of it; rescue then happens within this plus maintenance_interval)."""
    default_priority: int = 100
    """``default_priority`` given to a queue created on first use (lower runs sooner)."""
    pool_size: int = 5
    """Connections kept open per process."""
    max_overflow: int = 10
    """Extra connections a process may open above pool_size under load."""
    pool_timeout: float = 30.0
    """Seconds to wait for a free pooled connection before raising."""
    connect_timeout: float = 10.0
    """Seconds to wait for PostgreSQL to accept a new connection."""
    message_ttl: float = 300.0
    """Seconds Celery's remote-control messages and events may wait before they are dropped
    (only those, recognised by Celery's ``*.pidbox`` and ``celeryev`` names, and only when
    neither the message nor its queue sets a TTL; every other message waits until consumed)."""
    completed_retention: float | None = None
    """Seconds to keep completed and cancelled jobs; None means Celery's result_expires
    (1 day; also when result_expires is None or 0: the tier keeps no permanent history)."""
    failed_retention: float = 7 * 86_400.0
    """Seconds to keep failed jobs."""
    log_retention: float = 7 * 86_400.0
    """Seconds to keep job_logs rows of jobs that still exist."""
    max_logs_per_job: int = 25
    """Most job_logs rows kept per job; older attempts are pruned first."""
    maintenance_interval: float = 5.0
    """Seconds between orphan-rescue/retention passes inside a worker (one worker at a time)."""
    prune_batch_size: int = 1_000
    """Rows deleted per short transaction when pruning."""
    store_traceback: bool = False
    """Keep up to 1,000 characters of a failure's traceback in job_logs.log_message."""
    prepared_statements: bool = True
    """Let psycopg prepare repeated statements on the server; turn off behind PgBouncer
    in transaction pooling mode (before 1.21, or without max_prepared_statements)."""
    synchronous_commit: bool = True
    """Wait for the WAL flush on every commit. Off: ~10x cheaper writes, but a crash of
    the PostgreSQL server (not a clean restart) can lose the last ~0.6 s of commits."""
    batch_finishes: bool | None = None
    """Prefork pool processes hand their tasks' finishes to one writer process per worker
    node, which writes those ending close together as one statement on one connection:
    no pool process keeps a connection for them (fewer connections and statements, but
    an extra hop per task). None: on for a pool of 8 processes or more, where finishes
    arrive together (``completions.AUTO_POOL``); in a smaller pool the hop costs more
    than it saves."""

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> PgQueueOptions:
        """Build options from a user mapping, refusing unknown keys and bad values."""
        raw = dict(raw or {})
        names = [f.name for f in fields(cls)]
        for key in sorted(set(raw) - set(names) - KOMBU_RETRY_KEYS):
            near = difflib.get_close_matches(key, names, n=1)
            hint = (
                f"; did you mean {near[0]!r}?" if near else f"; known options: {', '.join(names)}"
            )
            raise ConfigurationError(f"unknown pgqueue option {key!r}{hint}")
        values = {k: _coerce(k, raw[k]) for k in names if k in raw}
        options = cls(**values)
        options.validate()
        return options

    def validate(self) -> None:
        """Check ranges; raise ConfigurationError naming the key and what is allowed."""
        # Any name PostgreSQL accepts: it is always quoted, never formatted into SQL.
        size = len(self.schema.encode())
        if not 1 <= size <= IDENTIFIER_BYTES or "\x00" in self.schema:
            raise ConfigurationError(
                f"pgqueue option 'schema' must be 1 to {IDENTIFIER_BYTES} bytes without "
                f"NUL (PostgreSQL would cut a longer name), got {self.schema!r} ({size} bytes)"
            )
        if self.schema.startswith("pg_"):
            raise ConfigurationError(
                f"pgqueue option 'schema' cannot start with 'pg_' (PostgreSQL keeps that "
                f"prefix for its own schemas), got {self.schema!r}"
            )
        positive = (
            "polling_interval",
            "lease_seconds",
            "pool_timeout",
            "connect_timeout",
            "message_ttl",
            "failed_retention",
            "log_retention",
            "maintenance_interval",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"pgqueue option {name!r} must be > 0 seconds")
        if self.completed_retention is not None and self.completed_retention <= 0:
            raise ConfigurationError("pgqueue option 'completed_retention' must be > 0 seconds")
        at_least_one = (
            "max_payload_bytes",
            "max_canvas_bytes",
            "pool_size",
            "prune_batch_size",
            "max_logs_per_job",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigurationError(f"pgqueue option {name!r} must be >= 1")
        if self.max_overflow < 0:
            raise ConfigurationError("pgqueue option 'max_overflow' must be >= 0")


DEFAULT_COMPLETED_RETENTION = 86_400.0
"""Seconds completed and cancelled jobs are kept when nothing else says: one day,
Celery's own default for ``result_expires``."""


def completed_retention(options: PgQueueOptions, result_expires: Any) -> float:
    """Seconds to keep completed and cancelled jobs, for every path that prunes them.

    The worker's maintenance, the backend's ``cleanup`` and the CLI's ``prune`` all
    ask here: ``completed_retention`` if set, else Celery's ``result_expires`` (a
    timedelta or seconds), else :data:`DEFAULT_COMPLETED_RETENTION`. Celery reads
    ``result_expires = None`` (or 0) as "never"; the tier keeps no permanent history,
    so here it means the default: set ``completed_retention`` to keep jobs longer.
    """
    if options.completed_retention is not None:
        return float(options.completed_retention)
    if isinstance(result_expires, timedelta):
        result_expires = result_expires.total_seconds()
    if isinstance(result_expires, int | float) and not isinstance(result_expires, bool):
        if result_expires > 0:
            return float(result_expires)
    return DEFAULT_COMPLETED_RETENTION


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(PgQueueOptions)


def _coerce(name: str, value: Any) -> Any:
    """Accept the obvious spellings (``"2.5"`` for a float, ``"false"`` for a bool)."""
    kind = _hints()[name]
    optional = False
    if isinstance(kind, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional, kind = True, args[0]
    if value is None and optional:
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"pgqueue option {name!r} expects {kind.__name__}, got {value!r}"
        ) from None


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A parsed ``pgqueue://`` URL: libpq parameters, password kept out of ``repr``."""

    host: str | None
    port: int | None
    user: str | None
    password: str | None
    database: str | None
    query: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        return f"DatabaseURL({self.masked()!r})"

    @classmethod
    def parse(cls, url: str) -> DatabaseURL:
        """Parse ``pgqueue://user:pass@host:port/db?libpq_option=value``."""
        if not isinstance(url, str) or "://" not in url:
            raise ConfigurationError(
                f"not a database URL: {mask_password(str(url))!r}; expected "
                "pgqueue://user:password@host:5432/dbname"
            )
        scheme = url.split("://", 1)[0].lower()
        if scheme not in URL_SCHEMES:
            raise ConfigurationError(
                f"unsupported URL scheme {scheme!r}; use pgqueue://user:password@host:5432/dbname"
            )
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise ConfigurationError(
                f"bad port in URL {mask_password(url)!r}; expected a number 1-65535"
            ) from None
        database = unquote(parts.path.lstrip("/")) or None
        if database and "/" in database:
            raise ConfigurationError(
                f"bad database name in URL {mask_password(url)!r}: {database!r}"
            )
        query = tuple(parse_qsl(parts.query, keep_blank_values=True))
        _check_libpq_keys(query, url)
        return cls(
            host=parts.hostname or None,
            port=port,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            database=database,
            query=query,
        )

    def _render(self, scheme: str, password: str | None) -> str:
        auth = ""
        if self.user:
            auth = quote(self.user, safe="")
            if password is not None:
                auth += ":" + password
            auth += "@"
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{self.port}" if self.port else ""
        db = f"/{quote(self.database, safe='')}" if self.database else "/"
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in self.query)
        return f"{scheme}://{auth}{host}{port}{db}" + (f"?{query}" if query else "")

    def sqlalchemy_url(self) -> str:
        """The URL SQLAlchemy's psycopg 3 dialect understands (password included)."""
        pw = quote(self.password, safe="") if self.password is not None else None
        return self._render("postgresql+psycopg", pw)

    def libpq_url(self) -> str:
        """A plain ``postgresql://`` URL for psycopg and libpq tools (password included)."""
        pw = quote(self.password, safe="") if self.password is not None else None
        return self._render("postgresql", pw)

    def masked(self, scheme: str = "pgqueue") -> str:
        """The URL with the password replaced by ``**``: safe for logs and reports."""
        return self._render(scheme, "**" if self.password is not None else None)

    def key(self) -> str:
        """Identity of the server and database, for sharing one pool per process."""
        return self.libpq_url()


def mask_password(text: str) -> str:
    """Hide the password in any ``scheme://user:password@`` inside ``text``."""
    return re.sub(r"(\w[\w+.-]*://[^:/@\s]*:)[^@\s]*@", r"\1**@", text)


def _check_libpq_keys(query: tuple[tuple[str, str], ...], url: str) -> None:
    """Reject URL query keys libpq does not know, instead of failing at connect time."""
    if not query:
        return
    from psycopg import pq  # psycopg is heavy; only needed with a query

    known = {opt.keyword.decode() for opt in pq.Conninfo.get_defaults()}
    for key, _ in query:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigurationError(
                f"unknown connection parameter {key!r} in URL {mask_password(url)!r}{hint} "
                "(the query string takes libpq parameters such as sslmode=require; "
                "pgqueue options go in broker_transport_options)"
            )


def first_url(value: Any) -> str | None:
    """The first of Kombu's failover URLs (a list, or a ';'-separated string)."""
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if not isinstance(value, str) or not value:
        return None
    return value.split(";", 1)[0].strip()


def is_postgres_url(url: str) -> bool:
    """Whether a URL names a PostgreSQL database we can use."""
    return url.split("://", 1)[0].lower() in URL_SCHEMES


def app_database(app: Any) -> tuple[str, Any] | None:
    """(URL, transport options) of an app's PostgreSQL broker, else its result backend."""
    conf = app.conf
    for url_setting, options_setting in (
        ("broker_url", "broker_transport_options"),
        ("result_backend", "result_backend_transport_options"),
    ):
        url = first_url(getattr(conf, url_setting, None))
        if url is not None and is_postgres_url(url):
            return url, conf.get(options_setting)
    return None
