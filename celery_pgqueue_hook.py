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
#: ``apply_async``'s keyword (and the task attribute) that makes a publish unique.
UNIQUE = "unique_key"


def _register(module: ModuleType) -> None:
    aliases = getattr(module, "TRANSPORT_ALIASES", None)
    if isinstance(aliases, dict):
        aliases.setdefault(ALIAS, TARGET)


def _deferred(original: Any, needs_us: Any, factory: str, marker: str) -> Any:
    """``original``, wrapped so that only a call that needs us imports our package.

    ``needs_us(self, *args, **kwargs)`` decides per call; the first call that needs us
    imports ``factory`` (``"module:function"``), which wraps ``original``, and every
    later one uses that. Apps on other brokers never import ``celery_pgqueue`` (nor its
    SQLAlchemy and psycopg), whatever else is installed here.
    """
    import functools  # loaded long before Celery is, so free here

    ours: list[Any] = []

    @functools.wraps(original)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not needs_us(self, *args, **kwargs):
            return original(self, *args, **kwargs)
        if not ours:
            module, _, name = factory.partition(":")
            try:
                ours.append(getattr(__import__(module, fromlist=[name]), name)(original))
            except ImportError:  # package half-installed: Celery's own behaviour
                ours.append(original)
        return ours[0](self, *args, **kwargs)

    setattr(call, marker, True)
    return call


def _is_ours(app: Any) -> bool:
    conf = getattr(app, "conf", None)
    return str(getattr(conf, "broker_url", None) or "").startswith(ALIAS)


def _group_is_ours(group: Any, *args: Any, **options: Any) -> bool:
    return _is_ours(getattr(group, "app", None))


def _publish_is_unique(app: Any, name: Any = None, *args: Any, **options: Any) -> bool:
    if options.get(UNIQUE) is None:
        task = options.get("task_type") or app._tasks.get(name)
        if getattr(task, UNIQUE, None) is None:
            return False  # the common publish: two lookups, no conf read
    return _is_ours(app)


def _batch_groups(module: ModuleType) -> None:
    """A pgqueue group is published in one INSERT (:mod:`celery_pgqueue.batching`)."""
    group = getattr(module, "group", None)
    current = getattr(group, "apply_async", None)
    if current is None or getattr(current, "__pgqueue_batched__", False):
        return
    group.apply_async = _deferred(  # type: ignore[union-attr]
        current, _group_is_ours, "celery_pgqueue.batching:batched", "__pgqueue_batched__"
    )


def _unique_publishes(module: ModuleType) -> None:
    """``apply_async`` takes ``unique_key`` (:mod:`celery_pgqueue.unique`)."""
    celery = getattr(module, "Celery", None)
    current = getattr(celery, "send_task", None)
    if current is None or getattr(current, "__pgqueue_unique__", False):
        return
    celery.send_task = _deferred(  # type: ignore[union-attr]
        current, _publish_is_unique, "celery_pgqueue.unique:unique", "__pgqueue_unique__"
    )


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
