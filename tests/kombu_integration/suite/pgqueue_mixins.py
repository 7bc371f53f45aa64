"""Kombu's transport integration mixins, wired to ``pgqueue://`` (copied as test_pgqueue.py).

This file runs only next to Kombu's ``common.py`` (see ``../run.py``); the fixtures
``connection``, ``invalid_connection`` and ``failover_connection`` come from
``fixtures.py``. Nothing here relaxes a mixin: each class is the mixin as Kombu wrote it.
"""

from __future__ import annotations

from . import common  # type: ignore[attr-defined]
from .common import (  # type: ignore[import-not-found]
    BaseExchangeTypes,
    BaseFailover,
    BaseMessage,
    BasePriority,
    BaseTimeToLive,
    BasicFunctionality,
)


class TestPgQueueBasicFunctionality(BasicFunctionality):
    pass


class TestPgQueueBaseExchangeTypes(BaseExchangeTypes):
    pass


class TestPgQueueBaseMessage(BaseMessage):
    pass


class TestPgQueueBasePriority(BasePriority):
    # Kombu names the Redis order (lower number served first) 'desc'; ours is the same.
    PRIORITY_ORDER = "desc"


if hasattr(common, "BaseEventLoop"):  # Kombu 5.7+; Kombu 5.5 has no such mixin

    class TestPgQueueBaseEventLoop(common.BaseEventLoop):  # type: ignore[misc]
        pass


class TestPgQueueBaseTimeToLive(BaseTimeToLive):
    pass


class TestPgQueueBaseFailover(BaseFailover):
    pass
