"""The wheel carries the migrations: `pgqueue migrate` works from an installed package
with no checkout around."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        check=True,
        timeout=240,
    )
    [built] = out.glob("celery_pgqueue-*.whl")
    return built


@pytest.mark.slow
def test_wheel_ships_every_migration_and_the_startup_hook(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    in_checkout = {
        f"celery_pgqueue/migrations/versions/{p.name}"
        for p in (REPO / "migrations" / "versions").glob("*.py")
    }

    assert "celery_pgqueue/migrations/versions/0001_tier_tables.py" in names
    assert in_checkout <= names
    assert "celery_pgqueue/migrations/env.py" in names
    assert "celery_pgqueue.pth" in names
    assert "celery_pgqueue_hook.py" in names


@pytest.mark.slow
def test_installed_wheel_finds_its_own_migrations(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import celery_pgqueue.migrate as m;"
        "print(m.__file__); print(m.migrations_dir()); print(m.head_revision());"
        "print('CREATE TABLE jobs' in m.upgrade_sql())"
    )

    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=tmp_path,
    )

    module, migrations, head, has_ddl = result.stdout.split()
    assert Path(module).is_relative_to(tmp_path)
    assert Path(migrations) == tmp_path / "celery_pgqueue" / "migrations"
    from celery_pgqueue.migrate import head_revision

    assert head == head_revision()
    assert has_ddl == "True"
