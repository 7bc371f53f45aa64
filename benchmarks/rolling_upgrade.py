"""A rolling upgrade: the previous revision's workers and producers against the new schema.

    git worktree add --detach /tmp/cpq-old 5a792ab       # the last commit whose head was 0005
    python benchmarks/rolling_upgrade.py --old /tmp/cpq-old

``--old`` is a checkout of an older celery-pgqueue; its code runs with
``PYTHONPATH=<old>`` in front of this virtualenv's packages (its ``celery_pgqueue``
and ``celery_pgqueue_hook`` shadow the installed ones; the script checks). Steps, on
a scratch database of the server at ``--url``:

1. migrate to the old code's revision; an old worker runs tasks an old producer sends;
2. ``migrate`` to this checkout's head *while* the old worker runs: the old worker
   and old producer go on working against the new schema;
3. a new worker starts next to the old one: tasks from an old and from a new
   producer each reach a worker of either version and return the right result;
4. the old worker stops; the new one finishes everything;
5. the other way round: new code on a database still at the old revision refuses
   to start (``SchemaMissing``), naming the migrate command.

Prints what happened at each step and exits non-zero if a task was lost or wrong. A
check to rerun before a release, not part of the test suite (it needs an old checkout).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from celery_pgqueue import migrate

APP = """\
import os
from celery import Celery

app = Celery("upgrade")
app.conf.update(
    broker_url=os.environ["CPQ_URL"],
    result_backend=os.environ["CPQ_URL"],
    broker_transport_options={"polling_interval": 0.5},
    worker_hijack_root_logger=False,
)


@app.task(name="upgrade.add")
def add(x, y):
    import celery_pgqueue
    return [x + y, os.path.dirname(os.path.dirname(celery_pgqueue.__file__))]
"""

SEND = """\
import json, sys
from upgrade_app import add
results = [add.delay(i, 1000) for i in range(int(sys.argv[1]))]
print(json.dumps([r.get(timeout=60) for r in results]))
"""


def env_for(source: str | None, url: str, folder: Path) -> dict[str, str]:
    paths = [str(folder)] + ([source] if source else [])
    env = {**os.environ, "CPQ_URL": url, "PYTHONPATH": os.pathsep.join(paths)}
    return env


def worker(env: dict[str, str], folder: Path, name: str) -> subprocess.Popen[bytes]:
    log = open(folder / f"{name}.log", "wb")  # kept open for the child
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "upgrade_app",
            "worker",
            "-P",
            "threads",
            "-c",
            "2",
            "-n",
            f"{name}@%h",
            "-l",
            "info",
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def send(env: dict[str, str], folder: Path, count: int) -> list[list[object]]:
    done = subprocess.run(
        [sys.executable, "-c", SEND, str(count)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"producer failed:\n{done.stderr[-3000:]}")
    import json

    results: list[list[object]] = json.loads(done.stdout)
    return results


def check(label: str, results: list[list[object]], count: int) -> set[str]:
    sums = [r[0] for r in results]
    ran_by = {str(r[1]) for r in results}
    ok = sums == [i + 1000 for i in range(count)]
    verdict = "right" if ok else "WRONG"
    print(f"  {label}: {len(results)}/{count} results {verdict}; ran by {sorted(ran_by)}")
    if not ok:
        raise SystemExit(1)
    return ran_by


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="checkout of the previous revision")
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--tasks", type=int, default=40)
    args = parser.parse_args()
    old = str(Path(args.old).resolve())
    new = str(Path(migrate.__file__).resolve().parent.parent)
    old_revision = re.search(
        r'REQUIRED_REVISION = "(\d+)"', (Path(old) / "celery_pgqueue/store/schema.py").read_text()
    )
    assert old_revision, "no REQUIRED_REVISION in the old checkout"
    old_head, new_head = old_revision.group(1), migrate.head_revision()
    print(f"old code {old} (needs {old_head}); new code {new} (head {new_head})")

    name = f"cpq_upgrade_{secrets.token_hex(4)}"
    with psycopg.connect(args.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db_url = args.url.rsplit("/", 1)[0] + "/" + name
    url = "pgqueue://" + db_url.split("://", 1)[1]
    folder = Path(tempfile.mkdtemp(prefix="cpq-upgrade-"))
    (folder / "upgrade_app.py").write_text(APP)
    old_env, new_env = env_for(old, url, folder), env_for(None, url, folder)
    started: list[subprocess.Popen[bytes]] = []

    def round_trip(label: str, env: dict[str, str]) -> set[str]:
        return check(label, send(env, folder, args.tasks), args.tasks)

    try:
        migrate.upgrade(db_url, old_head)
        print(f"1. schema at {old_head}; old worker, old producer")
        old_worker = worker(old_env, folder, "old")
        started.append(old_worker)
        assert check("old producer", send(old_env, folder, args.tasks), args.tasks) == {old}

        print(f"2. migrate {old_head} -> {new_head} while the old worker runs")
        t0 = time.perf_counter()
        migrate.upgrade(db_url, "head")
        print(f"  migrated in {time.perf_counter() - t0:.2f} s")
        assert round_trip("old producer after migrate", old_env) == {old}

        print("3. a new worker joins the old one")
        new_worker = worker(new_env, folder, "new")
        started.append(new_worker)
        time.sleep(5)
        seen = check("old producer, mixed workers", send(old_env, folder, args.tasks), args.tasks)
        seen |= check("new producer, mixed workers", send(new_env, folder, args.tasks), args.tasks)
        print(f"  both versions ran tasks: {seen == {old, new}}")

        print("4. the old worker stops")
        stop(old_worker)
        assert round_trip("new producer, new worker", new_env) == {new}
        assert round_trip("old producer, new worker", old_env) == {new}
        stop(new_worker)

        print(f"5. new code against a schema still at {old_head}")
        migrate.downgrade(db_url, old_head)
        refused = subprocess.run(
            [sys.executable, "-c", "from upgrade_app import add; add.delay(1, 2)"],
            cwd=folder,
            env=new_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        last = (refused.stderr.strip().splitlines() or ["(nothing)"])[-1]
        print(f"  new producer: exit {refused.returncode}: {last}")
    finally:
        for process in started:
            if process.poll() is None:
                stop(process)
        with psycopg.connect(args.url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    print(f"worker logs in {folder}")


if __name__ == "__main__":
    main()
