"""The result backend Celery loads (``pgqueue://``): its parts composed, the store opened."""

from __future__ import annotations

import logging
from typing import Any

from celery.backends.asynchronous import AsyncBackendMixin
from kombu.serialization import prepare_accept_content

from celery_pgqueue import completions  # noqa: F401  (starts with a prefork pool)
from celery_pgqueue.backend.chords import GroupsAndChords
from celery_pgqueue.backend.encoding import JSON, ResultEncoding
from celery_pgqueue.backend.reading import StateReading
from celery_pgqueue.backend.storing import StateStoring
from celery_pgqueue.backend.waiting import ResultConsumer
from celery_pgqueue.errors import ConfigurationError, DatabaseUnavailable
from celery_pgqueue.ids import job_id_for
from celery_pgqueue.options import (
    DatabaseURL,
    PgQueueOptions,
    completed_retention,
    first_url,
    pool_conflict,
)
from celery_pgqueue.store import Store

logger = logging.getLogger("celery_pgqueue")


class PgQueueBackend(
    StateStoring,
    StateReading,
    GroupsAndChords,
    ResultEncoding,
    AsyncBackendMixin,  # type: ignore[misc]
):
    """Celery result backend on the Queue/Jobs tier; see :mod:`celery_pgqueue.backend`."""

    ResultConsumer = ResultConsumer

    #: Every state of a task whose result it stores is written here, fenced by the
    #: delivery's attempt: :mod:`celery_pgqueue.finalize` leaves those rows alone.
    settles_jobs = True

    supports_native_join = True
    supports_autoexpire = False
    persistent = True

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, url=url, **kwargs)
        self.url = url or app.conf.result_backend
        self.database_url = DatabaseURL.parse(self.url)
        self.options = PgQueueOptions.parse(app.conf.result_backend_transport_options or {})
        _check_shared_pool(app, self.database_url, self.options)
        self._store: Store | None = None
        self._inline_json = self.content_type == JSON
        self._task_accept = prepare_accept_content(app.conf.accept_content)
        self.result_consumer = self.ResultConsumer(
            self, self.app, self.accept, self._pending_results, self._pending_messages
        )

    @property
    def store(self) -> Store:
        """The process's shared store for this database (checked once for the schema)."""
        if self._store is None:
            # Our own view on the process's pool: our options govern our work even
            # when the broker opened the pool.
            store = Store.for_url(self.database_url, self.options)
            store.check_schema()
            self._store = store
        return self._store

    def as_uri(self, include_password: bool = False) -> str:
        if include_password:
            return str(self.url)
        return self.database_url.masked()

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        return super().__reduce__(args, dict(kwargs or {}, url=self.url))

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """With ``result_backend_always_retry``: retry only a lost connection."""
        return isinstance(exc, DatabaseUnavailable)

    @property
    def _extended(self) -> bool:
        return bool(self.app.conf.find_value_for_key("extended", "result"))

    # -- forget, retention -------------------------------------------------------------

    def _forget(self, task_id: str) -> None:
        self.store.delete([job_id_for(task_id)])

    def forget(self, task_id: str) -> None:
        super().forget(task_id)
        self.result_consumer.cancel_for(task_id)

    def cleanup(self) -> None:
        """``celery.backend_cleanup``: delete expired finished jobs, logs and groups.

        Completed and cancelled jobs older than ``completed_retention`` (default:
        ``result_expires``), failed ones older than ``failed_retention``, in batches of
        ``prune_batch_size`` rows per transaction.
        """
        retention = completed_retention(self.options, self.expires)
        counts = self.store.prune(completed_retention=retention)
        groups = self.store.prune_groups(older_than=retention)
        logger.info(
            "pgqueue cleanup: %d completed, %d cancelled, %d failed jobs, %d logs, %d groups",
            counts.completed,
            counts.cancelled,
            counts.failed,
            counts.logs,
            groups,
        )


def _check_shared_pool(app: Any, url: DatabaseURL, ours: PgQueueOptions) -> None:
    """Refuse at start, not at the first result, options the shared pool cannot honour.

    A pgqueue broker on the same database and schema shares one connection pool per
    process with this backend: its size and its prepared statements cannot differ by
    role, so they must agree (every other option stays each role's own).
    """
    broker = first_url(app.conf.broker_url)
    if broker is None or not broker.lower().startswith("pgqueue://"):
        return
    try:
        theirs = PgQueueOptions.parse(app.conf.broker_transport_options or {})
        same_pool = DatabaseURL.parse(broker).key() == url.key()
    except ConfigurationError:
        return  # the broker reports its own mistakes when it starts
    if not same_pool or theirs.schema != ours.schema:
        return
    conflict = pool_conflict(theirs, ours)
    if conflict is not None:
        name, broker_value, backend_value = conflict
        raise ConfigurationError(
            f"pgqueue option {name!r} is {broker_value!r} in broker_transport_options but "
            f"{backend_value!r} in result_backend_transport_options; the broker and the "
            f"result backend on {url.masked()} share one connection pool per process, so "
            f"give {name} the same value in both"
        )
