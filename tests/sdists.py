"""Source distributions of the libraries we integrate with, cached for their test suites.

The wheels of Celery and Kombu do not carry their integration tests; their sdists do.
``fetch_sdist`` downloads one with pip on first use and keeps it under
``~/.cache/celery-pgqueue`` (or ``$XDG_CACHE_HOME``), so later runs work offline.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tempfile
from pathlib import Path


class SdistUnavailable(RuntimeError):
    """The sdist could not be downloaded (and none is cached)."""


def installed_version(package: str) -> str:
    return importlib.metadata.version(package)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "celery-pgqueue"


def fetch_sdist(package: str, version: str, cache: Path | None = None) -> Path:
    """The cached ``<package>-<version>.tar.gz``, downloaded with pip on first use."""
    directory = (cache or cache_dir()) / f"{package}-sdist"
    target = directory / f"{package}-{version}.tar.gz"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--disable-pip-version-check",
                f"{package}=={version}",
                "-d",
                scratch,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        found = list(Path(scratch).glob(f"{package}-{version}.tar.gz"))
        if done.returncode != 0 or not found:
            raise SdistUnavailable(
                f"pip could not download the {package} {version} sdist "
                f"(exit {done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}"
            )
        found[0].replace(target)  # atomic: concurrent runs never see half a file
    return target
