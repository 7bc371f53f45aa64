"""One producer process for the unique-task race: connect, wait for "go", publish once.

Run by ``test_unique.py`` eight times at once. Prints ``ready`` when its connection is
open, waits for a line on stdin, then publishes ``shop.charge(n)`` with
``unique_key=f"order-{n}"`` for n in 0..KEYS-1, in that order, and prints the task id
each ``apply_async`` returned, one per line.
"""

from __future__ import annotations

import sys

from celery import Celery

from celery_pgqueue.store import Store


def main(broker_url: str, keys: int) -> None:
    app = Celery("race", broker_url=broker_url, set_as_current=False)

    @app.task(name="shop.charge", shared=False)
    def charge(order_id: int) -> None: ...

    Store.for_url(broker_url).ensure_queues(["celery"])  # the pool's connection is open
    with app.producer_or_acquire() as producer:
        producer.channel  # noqa: B018  (the transport's channel exists before "go")
        print("ready", flush=True)
        sys.stdin.readline()
        ids = [
            charge.apply_async((n,), unique_key=f"order-{n}", producer=producer).id
            for n in range(keys)
        ]
    print("\n".join(ids), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
