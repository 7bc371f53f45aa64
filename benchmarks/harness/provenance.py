"""Where a run's numbers come from: the machine, the versions, the exact package source."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from harness.services import Services


def harness_digest() -> str:
    """sha256 of the harness's own code: a results row says which harness measured it."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*here.glob("*.py"), here.parent / "run.py"]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def snapshot_source(source: Path, workdir: Path, copy: bool) -> tuple[Path, dict[str, Any]]:
    """Copy the package, migrations and import hook; describe what was copied."""
    package = source / "celery_pgqueue"
    if not package.is_dir():
        raise SystemExit(f"--source {source}: no celery_pgqueue package there")
    digest = hashlib.sha256()
    for path in sorted([*package.rglob("*.py"), *(source / "migrations").rglob("*.py")]):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(source)).encode())
        digest.update(path.read_bytes())
    info: dict[str, Any] = {"path": str(source), "sha256": digest.hexdigest()}
    with contextlib.suppress(Exception):
        info["commit"] = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            [
                "git",
                "-C",
                str(source),
                "status",
                "--porcelain",
                "--",
                "celery_pgqueue",
                "migrations",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        info["dirty"] = bool(status.strip())
    if not copy:
        return source, info
    target = workdir / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(package, target / "celery_pgqueue", ignore=ignore)
    if (source / "migrations").is_dir():
        shutil.copytree(source / "migrations", target / "migrations", ignore=ignore)
    if (source / "celery_pgqueue_hook.py").is_file():
        shutil.copy2(source / "celery_pgqueue_hook.py", target)
    info["snapshot"] = True
    return target, info


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(Exception):
        import psutil

        memory = round(psutil.virtual_memory().total / 2**30, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "platform": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def versions(services: Services, pg_url: str) -> dict[str, str]:
    found: dict[str, str] = {"python": platform.python_version()}
    for module in ("celery", "kombu", "psycopg", "sqlalchemy", "redis", "amqp"):
        with contextlib.suppress(Exception):
            found[module] = __import__(module).__version__
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(pg_url, connect_timeout=2) as conn:
            found["PostgreSQL"] = str(conn.execute("SHOW server_version").fetchone()[0])
    with contextlib.suppress(Exception):
        found["Redis"] = str(services.redis.client().info("server")["redis_version"])
    with contextlib.suppress(Exception):
        with services.rabbit.connection() as conn:
            conn.connect()
            props = conn.connection.server_properties  # type: ignore[attr-defined]
            found["RabbitMQ"] = str(props.get("version"))
    return found
