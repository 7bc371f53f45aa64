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
