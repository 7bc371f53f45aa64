"""Prometheus metrics of the queue tier, read from PostgreSQL at each scrape.

``celery -A proj pgqueue metrics --port 9808`` serves them over HTTP; in your own
process, mount :func:`make_wsgi_app` (any WSGI server or framework) or register a
:class:`PgQueueCollector` in your own ``prometheus_client`` registry. Needs the
``metrics`` extra (``pip install "celery-pgqueue[metrics]"``).

The numbers come from the database, not from this process: any number of exporters
agree, and a restarted exporter loses nothing. A scrape runs two statements (see
:mod:`celery_pgqueue.store.metrics`): the live state of each work queue, read through
the partial indexes of queued and running jobs, and the totals in ``job_counters``.

================================================  =======  ==============================
metric                                            type     labels
================================================  =======  ==============================
``celery_pgqueue_up``                             gauge    (1: the database answered)
``celery_pgqueue_queue_paused``                   gauge    queue
``celery_pgqueue_jobs``                           gauge    queue, status (queued, running)
``celery_pgqueue_jobs_ready``                     gauge    queue
``celery_pgqueue_oldest_ready_job_age_seconds``   gauge    queue
``celery_pgqueue_jobs_lease_expired``             gauge    queue
``celery_pgqueue_jobs_finished_total``            counter  queue, status
``celery_pgqueue_lease_rescues_total``            counter  outcome (requeued, failed)
================================================  =======  ==============================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from celery_pgqueue.api import store_for
from celery_pgqueue.errors import ConfigurationError, PgQueueError
from celery_pgqueue.options import PgQueueOptions
from celery_pgqueue.store import Store
from celery_pgqueue.store import metrics as metrics_sql

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry

logger = logging.getLogger("celery_pgqueue.metrics")

PREFIX = "celery_pgqueue"
DEFAULT_PORT = 9808
INSTALL_HINT = (
    "the metrics need prometheus_client: pip install 'celery-pgqueue[metrics]' "
    "(or pip install prometheus_client)"
)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(INSTALL_HINT) from None
    return prometheus_client


class PgQueueCollector:
    """A ``prometheus_client`` collector: every scrape reads the database once."""

    def __init__(self, store: Store) -> None:
        _prometheus()
        self.store = store

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: a registry must not query the database when it is built."""
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily(f"{PREFIX}_up", "1 if the scrape could read the queue tier, else 0.")
        try:
            snapshot = metrics_sql.snapshot(self.store)
        except PgQueueError as exc:
            logger.warning("pgqueue metrics: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        paused = GaugeMetricFamily(
            f"{PREFIX}_queue_paused", "1 if the queue is paused (pgqueue pause).", labels=["queue"]
        )
        jobs = GaugeMetricFamily(
            f"{PREFIX}_jobs",
            "Jobs waiting (queued, due or scheduled) or running, per queue.",
            labels=["queue", "status"],
        )
        ready = GaugeMetricFamily(
            f"{PREFIX}_jobs_ready", "Queued jobs due now (run_at has passed).", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_oldest_ready_job_age_seconds",
            "How long the oldest due job has waited (0 when none waits).",
            labels=["queue"],
        )
        lapsed = GaugeMetricFamily(
            f"{PREFIX}_jobs_lease_expired",
            "Running jobs whose lease ran out: their worker is gone; rescue takes them back.",
            labels=["queue"],
        )
        for q in snapshot.queues:
            paused.add_metric([q.name], 0 if q.is_active else 1)
            jobs.add_metric([q.name, "queued"], q.queued)
            jobs.add_metric([q.name, "running"], q.running)
            ready.add_metric([q.name], q.ready)
            oldest.add_metric([q.name], max(q.oldest_ready_seconds or 0.0, 0.0))
            lapsed.add_metric([q.name], q.lease_expired)
        yield from (paused, jobs, ready, oldest, lapsed)

        finished = CounterMetricFamily(
            f"{PREFIX}_jobs_finished",
            "Jobs that reached a final status, per queue; counted by maintenance about "
            "10-15 s after they finish, never taken back by retention.",
            labels=["queue", "status"],
        )
        rescues = CounterMetricFamily(
            f"{PREFIX}_lease_rescues",
            "Running jobs taken back after their lease ran out: requeued, or failed as "
            "worker lost.",
            labels=["outcome"],
        )
        outcomes = {metrics_sql.RESCUED_REQUEUED: "requeued", metrics_sql.RESCUED_FAILED: "failed"}
        values = {(c.counter, c.queue_name): c.value for c in snapshot.counters}
        # Every work queue's counters exist from 0, so rate() sees the first failure.
        queues = sorted({q.name for q in snapshot.queues} | {q for (_, q) in values if q})
        for queue in queues:
            for status in metrics_sql.FINISHED:
                finished.add_metric([queue, status], values.get((status, queue), 0))
        for counter, outcome in outcomes.items():
            rescues.add_metric([outcome], values.get((counter, ""), 0))
        yield from (finished, rescues)


def registry_for(store: Store) -> CollectorRegistry:
    """A registry holding only the queue tier's metrics."""
    prometheus = _prometheus()
    registry: CollectorRegistry = prometheus.CollectorRegistry(auto_describe=False)
    registry.register(PgQueueCollector(store))
    return registry


def make_wsgi_app(
    app_or_url: Any, options: PgQueueOptions | None = None
) -> Callable[..., Iterable[bytes]]:
    """A WSGI app serving the metrics of ``app_or_url`` (a Celery app or a database URL).

    Mount it where your web framework serves other endpoints, e.g. under ``/metrics``.
    """
    prometheus = _prometheus()
    wsgi: Callable[..., Iterable[bytes]] = prometheus.make_wsgi_app(
        registry_for(store_for(app_or_url, options))
    )
    return wsgi


def serve(store: Store, *, port: int = DEFAULT_PORT, address: str = "0.0.0.0") -> Any:
    """Serve the metrics over HTTP from a background thread; returns the server."""
    prometheus = _prometheus()
    server, _thread = prometheus.start_http_server(port, addr=address, registry=registry_for(store))
    return server
