"""Run Celery's own integration tests (``t/integration`` of its sdist) against pgqueue.

Celery's integration suite is the conformance test for a broker and a result backend:
it starts a real prefork worker and runs chains, chords, groups, retries, revokes,
``inspect`` and serialization cases through ``TEST_BROKER`` and ``TEST_BACKEND``. The
wheel does not ship it, so this script takes the sdist matching the installed Celery
(cached under ``~/.cache/celery-pgqueue``), lays ``t/`` out in a temporary directory,
creates and migrates a scratch database, and runs pytest there in a fresh interpreter
with both URLs pointing at it. ``--against redis`` runs the same cases on the machine's
Redis, to tell our deviations from the ones Celery has on this machine anyway.

Usage::

    python tests/celery_integration/run.py        # tasks, inspect, worker, serialization, canvas
    python tests/celery_integration/run.py --files canvas -k chord
    python tests/celery_integration/run.py --against redis

Failures listed in ``deviations.py`` (each with its reason, also in the README) are
expected; the exit status is 0 when every other case passed, 1 otherwise, and 3 when
the sdist could not be obtained. ``--junitxml`` and other pytest arguments pass through.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the shared sdist cache and helpers
sys.path.insert(0, str(HERE))

from deviations import DEVIATIONS, REDIS_ALSO_FAILS  # noqa: E402
from sdists import SdistUnavailable, fetch_sdist, installed_version  # noqa: E402

SDIST_UNAVAILABLE = 3
PYTEST_RAN = (0, 1)
"""pytest's exit codes for "the tests ran" (all passed, some failed)."""
FILES = ("tasks", "inspect", "worker", "serialization", "canvas")
REDIS_URL = "redis://127.0.0.1:6379"

# Celery's pyproject.toml sets these for its suite; the sdist's t/ needs them.
PYTEST_INI = """\
[pytest]
python_classes = test_*
xfail_strict = true
markers =
    sleepdeprived_patched_module
    masked_modules
    patched_environ
    patched_module
    flaky
    timeout
    amqp
"""


def extract_suite(destination: Path, version: str) -> Path:
    """``t/`` of the Celery sdist (integration only) under ``destination``."""
    prefix = f"celery-{version}/"
    keep = ("t/__init__.py", "t/skip.py", "t/canvas_helpers.py", "t/integration/")
    with tarfile.open(fetch_sdist("celery", version)) as archive:
        members = []
        for member in archive.getmembers():
            name = member.name.removeprefix(prefix)
            if member.isfile() and name.startswith(keep):
                member.name = name
                members.append(member)
        archive.extractall(destination, members=members, filter="data")
    (destination / "pytest.ini").write_text(PYTEST_INI)
    return destination / "t" / "integration"


@contextmanager
def scratch_pgqueue_database() -> Iterator[str]:
    """A freshly migrated database on the test server; yields its ``pgqueue://`` URL."""
    import psycopg
    from helpers import with_database
    from psycopg import sql

    from celery_pgqueue.devserver import resolve_database_url
    from celery_pgqueue.migrate import upgrade

    admin, server = resolve_database_url()
    name = f"cpq_celery_it_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = with_database(admin, name)
        upgrade(url)
        try:
            yield "pgqueue://" + url.split("://", 1)[1]
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
    finally:
        if server is not None:
            server.cleanup()


def pytest_command(suite: Path, files: Sequence[str], args: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        *[str(suite / f"test_{name}.py") for name in files],
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(suite.parent.parent),
        "--timeout",
        "300",
        *args,
    ]


def outcomes(report: Path) -> dict[str, str]:
    """``{"test_file::Class::case": "passed" | "failed: message" | "skipped" | ...}``."""
    found: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        classname = case.get("classname", "").removeprefix("t.integration.")
        module, _, klass = classname.partition(".")
        key = f"{module}::{klass}::{case.get('name')}" if klass else f"{module}::{case.get('name')}"
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = f"failed: {(child.get('message') or child.tag)[:300]}"
            elif child.tag == "skipped":
                kind = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                status = f"{kind}: {(child.get('message') or '')[:200]}"
        found[key] = status
    return found


def summarize(found: dict[str, str], against: str) -> int:
    """Print counts and the cases that need a look; 0 when only known cases failed."""
    known = {**DEVIATIONS, **REDIS_ALSO_FAILS} if against == "pgqueue" else REDIS_ALSO_FAILS
    counts: dict[str, int] = {}
    for status in found.values():
        kind = status.split(":", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    print("\ncelery integration suite against", against, dict(sorted(counts.items())))
    unexpected = {k: v for k, v in found.items() if v.startswith("failed") and k not in known}
    known_failed = {k: v for k, v in found.items() if v.startswith("failed") and k in known}
    now_pass = [k for k, v in found.items() if v == "passed" and k in known]
    for key in sorted(known_failed):
        print(f"  known   {key}: {known[key]}")
    for key in now_pass:
        print(f"  passes  {key} (listed as a known failure; remove it from deviations.py)")
    for key, status in sorted(unexpected.items()):
        print(f"  FAILED  {key}: {status}")
    print(
        f"{len(unexpected)} unexpected failures, {len(known_failed)} known,"
        f" {len(now_pass)} known that now pass"
    )
    return 1 if unexpected else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", choices=("pgqueue", "redis"), default="pgqueue")
    parser.add_argument("--files", default=",".join(FILES), help="comma-separated, e.g. canvas")
    parser.add_argument("--outcomes", metavar="PATH", help="write every case's outcome as JSON")
    known, rest = parser.parse_known_args(argv)
    files = [f.strip() for f in known.files.split(",") if f.strip()]
    with tempfile.TemporaryDirectory(prefix="cpq-celery-it-") as tmp:
        try:
            suite = extract_suite(Path(tmp), installed_version("celery"))
        except SdistUnavailable as exc:
            print(f"celery integration suite unavailable: {exc}", file=sys.stderr)
            return SDIST_UNAVAILABLE
        env = dict(os.environ)
        # The suite starts `celery` subprocesses: use this interpreter's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        found: dict[str, str] = {}
        with contextlib.ExitStack() as stack:
            if known.against == "redis":
                urls = {"TEST_BROKER": f"{REDIS_URL}/5", "TEST_BACKEND": f"{REDIS_URL}/6"}
            else:
                url = stack.enter_context(scratch_pgqueue_database())
                urls = {"TEST_BROKER": url, "TEST_BACKEND": url}
            # One pytest session (one session worker) per file: a case that breaks the
            # worker (one in test_worker.py does so on Redis too) spoils only its file.
            for name in files:
                report = Path(tmp) / f"junit-{name}.xml"
                ran = subprocess.run(
                    pytest_command(suite, [name], [*rest, f"--junitxml={report}"]),
                    cwd=tmp,
                    env={**env, **urls},
                    check=False,
                )
                cases = outcomes(report) if report.exists() else {}
                found.update(cases)
                if ran.returncode not in PYTEST_RAN or not cases:
                    # Interrupted, a usage error (an unknown argument), nothing collected:
                    # a run that tested nothing must not read as one that passed.
                    found[f"test_{name}"] = (
                        f"failed: pytest exited {ran.returncode} after {len(cases)} cases"
                    )
        if known.outcomes:
            Path(known.outcomes).write_text(json.dumps(found, indent=1, sort_keys=True))
        return summarize(found, known.against)


if __name__ == "__main__":
    sys.exit(main())
