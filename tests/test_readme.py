"""The README stays true: its option table and its two commands."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

from celery_pgqueue.options import PgQueueOptions

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _table_rows() -> dict[str, str]:
    start = README.index("<!-- options-table")
    rows = {}
    for line in README[start:].splitlines()[3:]:
        if not line.startswith("| `"):
            break
        name, default = re.findall(r"`([^`]*)`", line)[:2]
        rows[name] = default
    return rows


def test_the_option_table_lists_every_option_with_its_default() -> None:
    expected = {}
    for f in fields(PgQueueOptions):
        default = f.default if f.default is not MISSING else None
        expected[f.name] = str(default)
    assert _table_rows() == expected


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    command = re.search(r"# 2\. .*\n(.+)\n", README)
    assert command is not None
    assert command.group(1).strip() in (ROOT / ".ci" / "run").read_text()
