"""A Django/Flask-style settings module: Celery reads the CELERY_-prefixed names.

In a Django project these lines go in ``settings.py`` and ``celery.py`` calls
``app.config_from_object("django.conf:settings", namespace="CELERY")``; Flask apps do
the same from their config object. The database can be the application's own.
"""

import os

DATABASE_URL = os.environ.get(
    "CELERY_PGQUEUE_URL", "pgqueue://postgres@127.0.0.1:5432/settings_style"
)

CELERY_BROKER_URL = DATABASE_URL
CELERY_RESULT_BACKEND = DATABASE_URL
CELERY_BROKER_TRANSPORT_OPTIONS = {"polling_interval": 0.5, "lease_seconds": 60}
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1  # with acks_late: priorities hold across a backlog
