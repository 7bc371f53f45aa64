"""``pgqueue metrics``: serve the queue tier's Prometheus metrics over HTTP.

Registered into the ``pgqueue`` group by :mod:`celery_pgqueue.cli`. Runs until
stopped (Ctrl-C or SIGTERM); each scrape reads the database (two statements).
"""

from __future__ import annotations

import signal
import threading

import click

from celery_pgqueue.cli.runtime import current_runtime, database_options


@click.command()
@database_options
@click.option("--port", default=9808, show_default=True, type=click.IntRange(0, 65535))
@click.option("--address", default="0.0.0.0", show_default=True, help="Address to listen on.")
def metrics(port: int, address: str) -> None:
    """Serve Prometheus metrics (queue depth, ages, running, finished, rescues) at /metrics."""
    from celery_pgqueue import metrics as exporter

    store = current_runtime().store()
    server = exporter.serve(store, port=port, address=address)
    shown = server.server_address
    click.echo(
        f"serving metrics of {store.url.masked()} (schema {store.options.schema}) "
        f"on http://{shown[0]}:{shown[1]}/metrics",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
