"""Registers ``pgqueue://`` with Kombu in every process, with no import in user code.

Kombu has no entry-point group for transports: a URL scheme resolves only through
the dict ``kombu.transport.TRANSPORT_ALIASES``. The wheel installs
``celery_pgqueue.pth``, which imports this module at interpreter start. It adds the
alias as soon as ``kombu.transport`` is imported (or at once, if it already is),
without importing Kombu itself: processes that never use Celery pay nothing but
this small finder. When ``celery.canvas`` is imported it also lets groups published
through pgqueue go out as one INSERT (:mod:`celery_pgqueue.batching`), and when
``celery.app.base`` is, lets ``apply_async`` take ``unique_key``
(:mod:`celery_pgqueue.unique`).

This module is the one place all three are done. ``import celery_pgqueue`` imports it too
(and calls :func:`install`), so where the ``.pth`` did not run (``python -S``, an
install that skipped it) importing the package, or anything in it, does the same.
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
CANVAS = "celery.canvas"
APP_BASE = "celery.app.base"


def _register(module: ModuleType) -> None:
    aliases = getattr(module, "TRANSPORT_ALIASES", None)
    if isinstance(aliases, dict):
        aliases.setdefault(ALIAS, TARGET)


def _batch_groups(module: ModuleType) -> None:
    try:
        from celery_pgqueue.batching import install_group_batching
    except ImportError:  # package half-installed: groups publish one by one, as before
        return
    install_group_batching(module)


def _unique_publishes(module: ModuleType) -> None:
    try:
        from celery_pgqueue.unique import install_unique_publishes
    except ImportError:  # package half-installed: unique_key is an unknown property
        return
    install_unique_publishes(module)


_AFTER_IMPORT = {WATCHED: _register, CANVAS: _batch_groups, APP_BASE: _unique_publishes}


class _Loader:
    """Runs Kombu's own loader, then adds the alias."""

    def __init__(self, wrapped: Any, then: Any) -> None:
        self.wrapped = wrapped
        self.then = then

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self.wrapped, "create_module", None)
        return create(spec) if create else None

    def exec_module(self, module: ModuleType) -> None:
        self.wrapped.exec_module(module)
        self.then(module)


class _Finder:
    """Waits for ``kombu.transport``, ``celery.canvas`` and ``celery.app.base``."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        then = _AFTER_IMPORT.get(fullname)
        if then is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, then)  # type: ignore[assignment]
                return spec
        return None


def install() -> None:
    """Act now on whichever module is loaded, else when it is."""
    waiting = False
    for name, then in _AFTER_IMPORT.items():
        module = sys.modules.get(name)
        if module is not None:
            then(module)
        else:
            waiting = True
    if waiting and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
