"""All the configuration celery-pgqueue needs: two URLs (the rest is for priorities)."""

import os

broker_url = os.environ.get("CELERY_PGQUEUE_URL", "pgqueue://postgres@127.0.0.1:5432/minimal")
result_backend = broker_url

# Priorities (lower runs sooner) hold across a backlog only if a worker holds no more
# than it runs: by default Celery takes 4 tasks per process ahead of its pool.
worker_prefetch_multiplier = 1
task_acks_late = True
