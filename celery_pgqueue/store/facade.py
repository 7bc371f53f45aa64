"""The Store: one class made of the roles, over one shared connection core.

A process keeps one engine, one bounded pool (:class:`~celery_pgqueue.store.pool.Pool`),
per database and schema, shared by the transport, the result backend and the operator
API. Each of them sees it through its own :class:`Store`, which carries that role's
options: the broker's ``lease_seconds`` or ``use_notify`` govern broker work, the
backend's govern backend work, whichever role opened the pool. Only the pool's own
settings (:data:`~celery_pgqueue.options.POOL_OPTIONS`) must agree. Each public
method is one short transaction (or runs on a connection the caller passes, so a
caller can enqueue inside its own transaction).

Where each method lives:

- :mod:`~celery_pgqueue.store.connection`: pools, fork handling, transactions, error
  translation, retries, lending a caller's connection, the schema check;
- :mod:`~celery_pgqueue.store.routing`: queues and bindings;
- :mod:`~celery_pgqueue.store.broker`: enqueue, claim, ack, finish, heartbeat, rescue;
- :mod:`~celery_pgqueue.store.outcomes`: the result backend's states, groups, chords;
- :mod:`~celery_pgqueue.store.admin`: status, find, cancel, retry, retention.
"""

from __future__ import annotations

from celery_pgqueue.store.admin import Admin
from celery_pgqueue.store.broker import Broker
from celery_pgqueue.store.outcomes import Outcomes


class Store(Broker, Outcomes, Admin):
    """Every read and write of the tier, for one database URL and schema, as one role.

    ``options`` are the role's (the broker's, the backend's); the connections come
    from ``pool``, by default a private one. :meth:`for_url` gives the process's
    shared pool instead.
    """
