"""Django: enqueue_in(django.db.connection) against delay_on_commit, with a real kill.

Each scenario runs in its own Django process (tests/transaction/django_shop.py).
Killed right after its commit, the enqueue_in process still has its task run; the
delay_on_commit process lost it: the order row exists, no job was ever published.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import running_worker, wait_until
from tx_support import statuses

pytest.importorskip("django")
pytestmark = pytest.mark.worker

SHOP = Path(__file__).with_name("django_shop.py")


@pytest.fixture
def shop(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE confirmations (order_id int)")
    return database_url


def run_shop(database_url: str, scenario: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SHOP), database_url, scenario],
        capture_output=True,
        text=True,
        timeout=60,
    )


def orders(database_url: str) -> list[int]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id")]


def test_killed_after_commit_enqueue_in_keeps_the_task_and_delay_on_commit_loses_it(
    app: Any, shop: str
) -> None:

    killed = run_shop(shop, "enqueue-in-kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    lost = run_shop(shop, "on-commit-kill")
    assert lost.returncode == -signal.SIGKILL, lost.stderr

    # Both orders committed; only the enqueue_in one has its job.
    assert orders(shop) == [1, 2]
    assert len(statuses(shop)) == 1

    confirmed: list[int] = []

    @app.task(name="djshop.confirm", shared=False)
    def confirm(order_id: int) -> None:
        confirmed.append(order_id)

    with running_worker(app):
        wait_until(lambda: confirmed, timeout=15, message="order 1 is confirmed")
    assert confirmed == [1]  # order 2's confirmation was never sent
    assert [s for _, s in statuses(shop)] == ["completed"]


def test_a_rolled_back_atomic_block_leaves_no_order_and_no_job(shop: str) -> None:
    done = run_shop(shop, "enqueue-in-rollback")
    assert done.returncode == 0, done.stderr
    assert orders(shop) == []
    assert statuses(shop) == []


def test_outside_atomic_django_connection_is_refused_naming_atomic(shop: str) -> None:
    done = run_shop(shop, "outside-atomic")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["error"] == "TransactionError"
    assert "transaction.atomic()" in out["message"]
    assert statuses(shop) == []
