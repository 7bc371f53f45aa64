"""Session advisory locks: one process at a time for work every worker could do.

A session lock (not a transaction lock) spans the several short transactions of a
maintenance pass. It lives as long as the connection holding it: a process that dies
mid-pass frees it with its socket, so no stale lock needs clearing.
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
    """Take the lock if free, without waiting."""
    return bool(conn.execute(sa.select(sa.func.pg_try_advisory_lock(*key))).scalar_one())


def unlock(conn: sa.Connection, *, key: tuple[int, int]) -> bool:
    """Release a lock this session holds."""
    return bool(conn.execute(sa.select(sa.func.pg_advisory_unlock(*key))).scalar_one())
