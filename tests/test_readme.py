"""The README stays true: its option table and its two commands."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

from celery_pgqueue.options import POOL_OPTIONS, PgQueueOptions

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ROLES = {"broker", "backend", "both", "pool"}


def _table_rows() -> dict[str, tuple[str, str]]:
    """``option -> (default, role)`` from the README's options table."""
    start = README.index("<!-- options-table")
    lines = README[start:].splitlines()
    assert [c.strip() for c in lines[1].strip("|").split("|")] == [
        "option",
        "default",
        "role",
        "meaning",
    ]
    rows = {}
    for line in lines[3:]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
    return rows


def test_the_option_table_lists_every_option_with_its_default() -> None:
    expected = {}
    for f in fields(PgQueueOptions):
        default = f.default if f.default is not MISSING else None
        expected[f.name] = str(default)
    assert {name: default for name, (default, _) in _table_rows().items()} == expected


def test_the_option_table_says_which_role_each_option_applies_to() -> None:
    roles = {name: role for name, (_, role) in _table_rows().items()}
    assert set(roles.values()) <= ROLES, roles
    assert {name for name, role in roles.items() if role == "pool"} == set(POOL_OPTIONS)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    command = re.search(r"# 2\. .*\n(.+)\n", README)
    assert command is not None
    assert command.group(1).strip() in (ROOT / ".ci" / "run").read_text()


def test_the_supported_versions_table_names_tox_environments_that_exist() -> None:
    section = README[README.index("## Supported versions") : README.index("## Development")]
    named = set(re.findall(r"`tox -e ([\w-]+)", section))
    tox_ini = (ROOT / "tox.ini").read_text()
    env_list = re.search(r"^env_list = (.+)$", tox_ini, re.M)
    assert env_list is not None
    assert named and named <= {e.strip() for e in env_list.group(1).split(",")}, named


def test_the_development_tiers_use_declared_markers() -> None:
    section = README[README.index("## Development") :]
    used = set(re.findall(r'-m "([^"]+)"', section))
    words = {w for tier in used for w in tier.split() if w not in {"not", "and", "or"}}
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = set(re.findall(r'^\s+"(\w+): ', pyproject, re.M))
    assert words and words <= declared, (words, declared)
