"""Registers ``pgqueue://`` with Kombu in every process, with no import in user code.

Kombu has no entry-point group for transports: a URL scheme resolves only through
the dict ``kombu.transport.TRANSPORT_ALIASES``. The wheel installs
``celery_pgqueue.pth``, which imports this module at interpreter start. It adds the
alias as soon as ``kombu.transport`` is imported (or at once, if it already is),
without importing Kombu itself: processes that never use Celery pay nothing but
this small finder.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # keep interpreter start cheap: no typing/importlib.abc at runtime
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

ALIAS = "pgqueue"
TARGET = "celery_pgqueue.transport:Transport"
WATCHED = "kombu.transport"


def _register(module: ModuleType) -> None:
    aliases = getattr(module, "TRANSPORT_ALIASES", None)
    if isinstance(aliases, dict):
        aliases.setdefault(ALIAS, TARGET)


class _Loader:
    """Runs Kombu's own loader, then adds the alias."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self.wrapped, "create_module", None)
        return create(spec) if create else None

    def exec_module(self, module: ModuleType) -> None:
        self.wrapped.exec_module(module)
        _register(module)


class _Finder:
    """Waits for ``kombu.transport`` to be imported, then steps aside."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)  # type: ignore[assignment]
                return spec
        return None


def install() -> None:
    """Register now if Kombu is loaded, else when it is."""
    module = sys.modules.get(WATCHED)
    if module is not None:
        _register(module)
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
