"""``python -m celery_pgqueue.cli``: the standalone ``celery-pgqueue`` command."""

from __future__ import annotations

import sys

from celery_pgqueue.cli import main

main(sys.argv[1:])
