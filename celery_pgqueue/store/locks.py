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

import sqlalchemy as sa

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
