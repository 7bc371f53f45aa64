"""Database roles for the security tests: made per test, dropped at teardown.

Roles belong to the whole server, not to the test's database, so each name is random
and every role is dropped (with what it owns and was granted) when the test ends. Each
role gets a password, so the tests work on a trust server and on a password one alike.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql


def as_role(url: str, role: str, password: str) -> str:
    """``url`` (any scheme) logging in as ``role`` instead."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{quote(role)}:{quote(password)}@{host}"))


def database_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@contextmanager
def login_role(database_url: str, prefix: str) -> Iterator[tuple[str, str]]:
    """A new LOGIN role with no privileges beyond PUBLIC's: ``(name, password)``.

    ``database_url`` is an administrator's URL of the test database, the only one
    where the role is given anything; it is cleared there and dropped at the end.
    """
    name = f"{prefix}_{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
    try:
        yield name, password
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (name,),
            )
            # Also revokes what it was granted on the database itself (a shared object).
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
