"""Tests must not leak Celery tasks into one another.

``@app.task`` is shared by default: Celery then adds the task to every app created
later in the process, and an app that defines its own task of the same name gets the
first one instead (``t.flaky`` of tests/transport ran in place of tests/backend's when
both ran in one session). Every task a test module defines is therefore ``shared=False``.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _shared_task_decorators(path: Path) -> list[str]:
    """``file:line`` of each ``@<x>.task(...)`` in ``path`` that does not say ``shared=False``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for deco in node.decorator_list:
            call = deco if isinstance(deco, ast.Call) else None
            func = call.func if call else deco
            if not (isinstance(func, ast.Attribute) and func.attr == "task"):
                continue
            keywords = {k.arg: k.value for k in call.keywords} if call else {}
            shared = keywords.get("shared")
            if not (isinstance(shared, ast.Constant) and shared.value is False):
                found.append(f"{path.relative_to(TESTS)}:{deco.lineno}")
    return found


def test_every_task_defined_by_the_tests_is_not_shared() -> None:
    offenders = [
        hit for path in sorted(TESTS.rglob("*.py")) for hit in _shared_task_decorators(path)
    ]
    assert offenders == [], f"add shared=False to: {offenders}"
