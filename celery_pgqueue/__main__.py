"""``python -m celery_pgqueue``: the standalone ``celery-pgqueue`` command."""

from __future__ import annotations

from celery_pgqueue.cli import main

if __name__ == "__main__":
    main()
