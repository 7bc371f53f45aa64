"""Racing claimers: SKIP LOCKED hands every job to exactly one of them."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID

from store_factories import Db, new_job

from celery_pgqueue.store import Store

JOBS = 2_000
CLAIMERS = 8


def test_racing_claimers_take_every_job_exactly_once(store: Store, db: Db) -> None:
    store.enqueue([new_job("race", payload={"n": n}) for n in range(JOBS)])
    start = threading.Barrier(CLAIMERS)

    def claim_until_empty(worker: int) -> list[UUID]:
        taken: list[UUID] = []
        start.wait(timeout=30)
        while batch := store.claim("race", 7, f"worker-{worker}"):
            taken += [job.id for job in batch]
        return taken

    with ThreadPoolExecutor(CLAIMERS) as pool:
        per_worker = list(pool.map(claim_until_empty, range(CLAIMERS)))

    everything = [job_id for taken in per_worker for job_id in taken]
    duplicates = [job_id for job_id, n in Counter(everything).items() if n > 1]
    assert duplicates == []
    assert len(everything) == JOBS
    assert set(everything) == {r[0] for r in db.all("SELECT id FROM jobs")}
    assert db.all("SELECT status, attempt_count, count(*) FROM jobs GROUP BY 1, 2") == [
        ("running", 1, JOBS)
    ]
    assert db.scalar("SELECT count(*) FROM job_logs") == JOBS
    # Each job's lease names the worker that returned it.
    owners = dict(db.all("SELECT id, lease_owner FROM jobs"))
    for worker, taken in enumerate(per_worker):
        assert {owners[job_id] for job_id in taken} <= {f"worker-{worker}"}
    # More than one claimer took part: the race really happened.
    assert sum(1 for taken in per_worker if taken) > 1
