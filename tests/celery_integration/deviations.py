"""Celery integration cases that fail on purpose, or for every broker on this machine.

Keys are ``test_<file>::<class>::<case>`` as ``run.py`` prints them; values are the
reason, which the README repeats (section "Celery's own integration tests"). Keep
both lists short and each entry explained.
"""

from __future__ import annotations

# Fail against pgqueue by design: the tier's rules.
DEVIATIONS: dict[str, str] = {
    "test_inspect::test_Inspect::test_scheduled": (
        "ETA and countdown tasks wait in the database (run_at), never in a worker's"
        " memory, so `inspect scheduled` is empty by design; `pgqueue jobs --scheduled`"
        " lists them"
    ),
    "test_canvas::test_chain::test_chord_header_id_duplicated_on_rabbitmq_msg_duplication"
    "[redis-group-ids]": (
        "publishes the same task id twice to simulate a duplicated RabbitMQ message and"
        " expects it to run twice; the tier keeps one row per task id, so a re-published"
        " id is not run again"
    ),
}

# Fail against the machine's Redis too (run.py --against redis), so not ours to fix.
REDIS_ALSO_FAILS: dict[str, str] = {
    "test_tasks::test_trace_log_arguments::test_task_success": (
        "expects the worker's 'received' log record in the test process's caplog; fails"
        " the same way on Redis here"
    ),
    "test_tasks::test_trace_log_arguments::test_task_failed": (
        "as test_task_success: the worker's log records are not where the test looks, on Redis too"
    ),
}
