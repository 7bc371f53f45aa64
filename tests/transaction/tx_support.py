"""Helpers shared by the enqueue-in-transaction tests."""

from __future__ import annotations

from typing import Any

import psycopg


def statuses(database_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute("SELECT id, status FROM jobs").fetchall()


class JobInserts:
    """Counts the INSERT statements into ``jobs`` sent by any engine in this process."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "INSERT INTO jobs" in statement:
            self.count += 1
