"""``pgqueue://`` and group batching without the interpreter-start hook's ``.pth``.

The hook (``celery_pgqueue_hook``) is the one place both are set up; importing the
package runs it too. ``python -S`` skips site-packages and so every ``.pth``: the
paths are added by hand, as an install that skipped the ``.pth`` would have them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import celery_pgqueue

ROOT = Path(celery_pgqueue.__file__).resolve().parent.parent

PROBE = """
import json, sys
sys.path[:0] = {paths!r}
assert "celery_pgqueue_hook" not in sys.modules, "the .pth ran"
{imports}
from kombu.transport import TRANSPORT_ALIASES
import celery.canvas
print(json.dumps({{
    "alias": TRANSPORT_ALIASES.get("pgqueue"),
    "batched": getattr(celery.canvas.group.apply_async, "__pgqueue_batched__", False),
}}))
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import celery_pgqueue",  # before Kombu and Celery: the hook waits for them
        "import celery.canvas, kombu.transport; import celery_pgqueue.transport",  # after
    ],
    ids=["package-first", "kombu-first"],
)
def test_importing_the_package_registers_the_alias_and_batches_groups_without_the_pth(
    imports: str,
) -> None:
    paths = [str(ROOT), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    code = PROBE.format(paths=paths, imports=imports)
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "alias": "celery_pgqueue.transport:Transport",
        "batched": True,
    }


OTHER_BROKER = """
import json, sys
assert "celery_pgqueue_hook" in sys.modules, "the .pth did not run"
from celery import Celery, group

app = Celery("other", broker="memory://", backend="cache+memory://")

@app.task(name="other.add", shared=False)
def add(x, y):
    return x + y

add.delay(1, 2)
add.apply_async((1, 2), unique_key="k")  # a property like any other on this broker
group(add.s(1, 1), add.s(2, 2)).apply_async()
import celery.canvas
from celery.app.base import Celery as Base
print(json.dumps({
    "imported": "celery_pgqueue" in sys.modules,
    "batched": getattr(celery.canvas.group.apply_async, "__pgqueue_batched__", False),
    "unique": getattr(Base.send_task, "__pgqueue_unique__", False),
}))
"""


def test_apps_on_other_brokers_never_import_the_package() -> None:
    """The ``.pth`` hook costs a Celery app on Redis or RabbitMQ no import of ours.

    ``celery_pgqueue`` brings SQLAlchemy and psycopg: a process that only has it
    installed alongside must not load them on ``import celery`` or on publishing.
    """
    done = subprocess.run(
        [sys.executable, "-c", OTHER_BROKER],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "the .pth did not run" in done.stderr:  # pragma: no cover - install without .pth
        pytest.skip("this install runs no .pth (editable or -S); CI's wheel install does")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "imported": False,
        "batched": True,
        "unique": True,
    }
