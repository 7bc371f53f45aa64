"""All the configuration celery-pgqueue needs: two URLs."""

import os

broker_url = os.environ.get("CELERY_PGQUEUE_URL", "pgqueue://postgres@127.0.0.1:5432/postgres")
result_backend = broker_url
