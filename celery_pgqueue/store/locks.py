"""Advisory locks: one process at a time for work every worker could do.

The lock is transaction-scoped (``pg_try_advisory_xact_lock``) and its transaction
stays open on a connection of its own while the work runs on other connections, in
short transactions of their own. A transaction pins its server connection even
behind PgBouncer in transaction pooling, where a session lock would stay on a server
connection handed to someone else and its unlock would run elsewhere. Ending the
transaction (or losing the connection) releases it: there is no unlock to forget.
The open transaction takes no snapshot between statements and no transaction id,
so it does not hold back vacuum.
"""

from __future__ import annotations

import zlib
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import INTERVAL
from sqlalchemy.dialects.postgresql import insert as pg_insert

from celery_pgqueue.store.tables import job_counters

# First half of every lock key: "cpq" + 1, so our locks never collide with an
# application's single-key advisory locks, which use the other function variant.
NAMESPACE = 0x63707131


def key_for(purpose: str, schema: str) -> tuple[int, int]:
    """A stable two-int key per purpose and schema: two tiers in one database don't
    block each other."""
    digest = zlib.crc32(f"{purpose}:{schema}".encode())
    return NAMESPACE, digest - (1 << 32) if digest >= 1 << 31 else digest


def try_lock(conn: sa.Connection, *, key: tuple[int, int]) -> bool:
    """Take the lock for the rest of ``conn``'s transaction, if free, without waiting."""
    return bool(conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(*key))).scalar_one())


TURN_PREFIX = "turn:"
"""``job_counters.counter`` of a turn row (``queue_name`` ''): not a total, never shown."""


def take_turn(conn: sa.Connection, *, purpose: str, seconds: float) -> bool:
    """Whether this caller's turn for ``purpose`` has come, taking it for ``seconds``.

    One statement on a row of ``job_counters`` (``counted_until``: when the next turn
    is due, on the database's clock): the first caller after that moment moves it on
    and gets True; every other caller until then gets False. So work every worker
    could do (maintenance) runs once per period however many workers ask, and each
    asker spends one short transaction, not a pass.
    """
    c = job_counters
    due = sa.func.now() + sa.literal(timedelta(seconds=seconds), INTERVAL)
    insert = pg_insert(c).values(
        counter=TURN_PREFIX + purpose, queue_name="", value=1, counted_until=due
    )
    taken = conn.execute(
        insert.on_conflict_do_update(
            index_elements=[c.c.counter, c.c.queue_name],
            set_={"value": c.c.value + 1, "counted_until": due, "updated_at": sa.func.now()},
            where=sa.or_(c.c.counted_until.is_(None), c.c.counted_until <= sa.func.now()),
        ).returning(c.c.counter)
    ).first()
    return taken is not None
