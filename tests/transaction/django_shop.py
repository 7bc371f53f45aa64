"""A one-file Django "shop" the Django tests run as a subprocess.

    python django_shop.py <postgresql-url> <scenario>

It saves an order row inside ``transaction.atomic()`` and sends its confirmation task
one of two ways, then (in the ``*-kill`` scenarios) is killed with SIGKILL right after
the commit, before it can do anything else. Prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from urllib.parse import urlsplit

import django
from django.conf import settings

url = urlsplit(sys.argv[1])
scenario = sys.argv[2]
settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": url.path.lstrip("/"),
            "USER": url.username or "postgres",
            "PASSWORD": url.password or "",
            "HOST": url.hostname or "127.0.0.1",
            "PORT": str(url.port or 5432),
        }
    },
    USE_TZ=True,
)
django.setup()

from celery import Celery  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from celery_pgqueue.errors import TransactionError  # noqa: E402
from celery_pgqueue.transaction import enqueue_in  # noqa: E402

app = Celery(
    "shop",
    broker=f"pgqueue://{url.netloc}{url.path}",
    task_cls="celery.contrib.django.task:DjangoTask",
    set_as_current=False,
)


@app.task(name="djshop.confirm", shared=False)
def confirm(order_id: int) -> None: ...


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def save_order(order_id: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO orders VALUES (%s)", [order_id])


if scenario == "enqueue-in-kill":
    with transaction.atomic():
        save_order(1)
        with enqueue_in(connection):
            confirm.delay(1)
    kill_self()  # right after the commit
elif scenario == "on-commit-kill":
    with transaction.atomic():
        save_order(2)
        transaction.on_commit(kill_self)  # the process dies right after the commit...
        confirm.delay_on_commit(2)  # ...before this on_commit callback publishes
elif scenario == "enqueue-in-rollback":
    try:
        with transaction.atomic():
            save_order(3)
            with enqueue_in(connection):
                confirm.delay(3)
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
elif scenario == "outside-atomic":
    try:
        with enqueue_in(connection):
            confirm.delay(4)
    except TransactionError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        sys.exit(0)
print(json.dumps({"done": scenario}))
