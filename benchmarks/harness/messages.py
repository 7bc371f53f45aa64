"""A realistic ``jobs.payload``: what the transport stores for ``noop.delay(ts)``.

Captured once from Celery 5.7 through ``celery_pgqueue.payload.to_payload`` (759 bytes
as compact JSON); only the ids change per job. The store-level measures (ceiling,
backlog) insert this, so their rows are the size Celery's are.
"""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any

TEMPLATE: dict[str, Any] = {
    "body": [[1.0], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
    "body_encoding": "json",
    "content-type": "application/json",
    "content-encoding": "utf-8",
    "headers": {
        "lang": "py",
        "task": "bench.noop",
        "id": "",
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": "",
        "parent_id": None,
        "argsrepr": "(1.0,)",
        "kwargsrepr": "{}",
        "origin": "gen1@bench",
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    },
    "properties": {
        "correlation_id": "",
        "reply_to": "d8cee051-982e-3b9f-8755-df3cae2df51e",
        "delivery_mode": 2,
        "priority": None,
    },
    "exchange": "",
    "routing_key": "bench",
}


def payload(task_id: uuid.UUID | None = None) -> tuple[uuid.UUID, dict[str, Any]]:
    """A fresh id and its payload document."""
    task_id = task_id or uuid.uuid4()
    doc = copy.deepcopy(TEMPLATE)
    text = str(task_id)
    doc["headers"]["id"] = doc["headers"]["root_id"] = text
    doc["properties"]["correlation_id"] = text
    doc["body"][0][0] = time.time()
    return task_id, doc
