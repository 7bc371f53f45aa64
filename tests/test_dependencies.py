"""pyproject declares every package the code imports, with the bounds tox tests.

An import of a package that is not declared works on a developer's machine (something
else pulled it in) and fails for a user. Every third-party import in the package must
name a distribution in ``[project] dependencies`` or, for an optional feature, in one
of the extras; and the lowest-versions constraints tox installs must be the lower
bounds pyproject states, so the oldest claim is the tested one.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OWN = {"celery_pgqueue", "celery_pgqueue_hook", "__future__"}


def _name(requirement: str) -> str:
    """``psycopg[pool]>=3.2,<4`` -> ``psycopg`` (normalised as PyPI does)."""
    bare = re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", bare).lower()


def _with_extras(requirement: str) -> set[str]:
    """``psycopg[pool]>=3.2`` -> ``{"psycopg", "psycopg-pool"}`` (psycopg's extras are packages)."""
    base = _name(requirement)
    if "[" not in requirement:
        return {base}
    inner = requirement[requirement.index("[") + 1 : requirement.index("]")]
    return {base} | {f"{base}-{extra.strip()}" for extra in inner.split(",")}


def _declared(extras: bool) -> set[str]:
    project = PYPROJECT["project"]
    requirements = list(project["dependencies"])
    if extras:
        requirements += [r for group in project["optional-dependencies"].values() for r in group]
    return {name for requirement in requirements for name in _with_extras(requirement)}


def _imports(paths: list[Path]) -> dict[str, set[str]]:
    """Third-party top-level module -> the files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _distributions(module: str) -> set[str]:
    return {_name(d) for d in packages_distributions().get(module, [module])}


def test_every_import_of_the_package_is_declared() -> None:
    code = [*sorted((ROOT / "celery_pgqueue").rglob("*.py")), ROOT / "celery_pgqueue_hook.py"]
    declared = _declared(extras=True)
    undeclared = {
        module: sorted(files)
        for module, files in _imports(code).items()
        if not _distributions(module) & declared
    }
    assert undeclared == {}, f"declare these in pyproject.toml: {undeclared}"


def test_the_required_imports_are_core_dependencies() -> None:
    """What every user needs is in ``dependencies``, not only in an extra."""
    required = {"celery", "kombu", "click", "sqlalchemy", "psycopg", "alembic"}
    assert required <= _declared(extras=False)


def test_lower_bounds_are_the_versions_tox_tests_as_lowest() -> None:
    pins = {}
    for line in (ROOT / "tests" / "constraints" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_name(name)] = version.strip()
    for requirement in PYPROJECT["project"]["dependencies"]:
        lower = re.search(r">=\s*([\w.]+)", requirement)
        assert lower, f"{requirement} has no lower bound"
        assert re.search(r",\s*<", requirement), f"{requirement} has no upper bound"
        assert pins.get(_name(requirement)) == lower.group(1), (
            f"{requirement}: tests/constraints/lowest.txt pins {pins.get(_name(requirement))}"
        )
