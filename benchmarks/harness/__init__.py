"""The benchmark harness behind ``benchmarks/run.py`` (see ``benchmarks/README.md``).

Modules: ``app`` is the one Celery app every worker and producer imports; ``producer``
publishes from its own process; ``services`` knows each broker/backend configuration;
``workers`` runs ``celery worker`` subprocesses; ``measures`` times them; ``backlog`` and
``ceiling`` time the pgqueue store without Celery; ``report`` writes JSON lines and
Markdown.
"""
