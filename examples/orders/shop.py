"""An order and its confirmation task, committed together (celery-pgqueue example).

The order row and the task's ``jobs`` row are written in one transaction: if the
request fails after saving the order, neither exists; once it commits, the task is
there even if this process dies the next instant. See README.md here.
"""

from __future__ import annotations

import os
import time

import sqlalchemy as sa
from celery import Celery

from celery_pgqueue.transaction import enqueue_in

BROKER_URL = os.environ.get("CELERY_PGQUEUE_URL", "pgqueue://postgres@127.0.0.1:5432/orders")
# The application's own engine: same database as the broker, its own driver URL.
engine = sa.create_engine(BROKER_URL.replace("pgqueue://", "postgresql+psycopg://", 1))

app = Celery("shop", broker=BROKER_URL)

orders = sa.Table(
    "shop_orders",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("confirmed_at", sa.DateTime(timezone=True)),
)


@app.task(name="shop.send_confirmation")
def send_confirmation(order_id: int) -> None:
    """Runs only after the order committed, so the row is always there to read."""
    with engine.begin() as conn:
        email = conn.execute(sa.select(orders.c.email).where(orders.c.id == order_id)).scalar_one()
        print(f"confirming order {order_id} to {email}")
        conn.execute(
            orders.update().where(orders.c.id == order_id).values(confirmed_at=sa.func.now())
        )


def place_order(order_id: int, email: str) -> None:
    """Save the order and queue its confirmation in one transaction."""
    with engine.begin() as conn:  # commits at the end, or rolls back on error
        conn.execute(orders.insert().values(id=order_id, email=email))
        with enqueue_in(conn):
            send_confirmation.delay(order_id)  # the usual call: its row joins this transaction


def wait_confirmed(order_id: int, timeout: float = 30.0) -> bool:
    """Poll until the worker confirmed the order (for the README's one-liner)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            stmt = sa.select(orders.c.confirmed_at).where(orders.c.id == order_id)
            if conn.execute(stmt).scalar_one_or_none() is not None:
                return True
        time.sleep(0.1)
    return False


try:
    orders.metadata.create_all(engine)
except sa.exc.IntegrityError:  # the worker, started a moment before, created it just now
    pass
