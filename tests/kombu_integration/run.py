"""Run Kombu's own transport integration tests against ``pgqueue://``.

Kombu's sdist ships ``t/integration/common.py``: the mixins every transport's
integration tests subclass (``BasicFunctionality``, ``BaseExchangeTypes``,
``BaseMessage``, ``BasePriority``, ``BaseEventLoop``, ``BaseTimeToLive``,
``BaseFailover``). The wheel does not, so this script downloads the sdist matching the
installed Kombu (cached under ``~/.cache/celery-pgqueue``), copies ``common.py`` next
to our wiring (``suite/pgqueue_mixins.py``, ``suite/fixtures.py``) in a temporary
directory, and runs pytest there in a fresh interpreter.

Usage::

    python tests/kombu_integration/run.py [pytest arguments...]

Exit status is pytest's; 3 means the sdist could not be obtained (no network, say).
Priority is checked lowest number first (Kombu calls that order ``'desc'``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the shared sdist cache

from sdists import SdistUnavailable, fetch_sdist, installed_version  # noqa: E402

__all__ = ["SdistUnavailable", "fetch_sdist", "kombu_version", "run"]
SUITE = HERE / "suite"
SDIST_UNAVAILABLE = 3
COMMON = "t/integration/common.py"


def kombu_version() -> str:
    return installed_version("kombu")


def extract_common(sdist: Path, version: str) -> str:
    """The text of ``t/integration/common.py`` from the sdist."""
    member = f"kombu-{version}/{COMMON}"
    with tarfile.open(sdist) as archive:
        extracted = archive.extractfile(member)
        if extracted is None:
            raise SdistUnavailable(f"{sdist} has no {member}")
        return extracted.read().decode()


def prepare_suite(destination: Path, version: str | None = None) -> Path:
    """Lay out the runnable suite in ``destination``; returns the test package."""
    version = version or kombu_version()
    common = extract_common(fetch_sdist("kombu", version), version)
    package = destination / "kombu_it"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "common.py").write_text(common)
    shutil.copyfile(SUITE / "pgqueue_mixins.py", package / "test_pgqueue.py")
    shutil.copyfile(SUITE / "fixtures.py", destination / "conftest.py")
    return package


def pytest_command(package: Path, args: Sequence[str]) -> list[str]:
    """pytest in a fresh interpreter, without the plugins installed for the main suite."""
    return [
        sys.executable,
        "-m",
        "pytest",
        str(package),
        "-p",
        "pytest_timeout",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(package.parent),
        "--timeout",
        "60",
        *args,
    ]


def run(args: Sequence[str] = (), *, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Prepare the suite in a temporary directory and run it; raises SdistUnavailable."""
    with tempfile.TemporaryDirectory(prefix="cpq-kombu-it-") as tmp:
        package = prepare_suite(Path(tmp))
        env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        return subprocess.run(
            pytest_command(package, args),
            cwd=tmp,
            env=env,
            capture_output=capture,
            text=True,
            timeout=900,
            check=False,
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args).returncode
    except SdistUnavailable as exc:
        print(f"kombu integration suite unavailable: {exc}", file=sys.stderr)
        return SDIST_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
