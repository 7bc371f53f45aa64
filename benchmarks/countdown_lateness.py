"""How late does a countdown task start? pgqueue against Redis, side by side.

    python benchmarks/countdown_lateness.py                  # N = 200 per broker, 3 rounds
    python benchmarks/countdown_lateness.py --n 50 --rounds 1

Per broker and round (interleaved): one idle ``celery worker`` (prefork ``-c 2``, the
default early ack, no result backend), then N no-op tasks published with countdowns
spread over 1-3 s at about 20 publishes a second, so a worker is always free when a
task comes due. Each task appends its id and ``time.time()`` to a file: how long after
the ``eta`` it was sent with (what ``countdown`` becomes) it started, on the one clock
this machine has (PostgreSQL runs here too). pgqueue gets a scratch database on ``--url``
(dropped afterwards); Redis is 127.0.0.1:6379 DB ``--redis-db`` with a key prefix of
its own (its keys are deleted afterwards), skipped if it does not answer. Reports
p50 / p99 / max lateness in ms. A measurement, not a test: it never fails, it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from backend_results import scratch_database
from celery import Celery

APP = """\
import json
import os
import time

from celery import Celery

app = Celery("lateness")
app.conf.update(json.loads({config!r}))


@app.task(name="lateness.noop", bind=True)
def noop(self):
    started = time.time()
    fd = os.open({record!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{{self.request.id}} {{started:.6f}}\\n".encode())
    finally:
        os.close(fd)
"""


def redis_up(db: int) -> bool:
    try:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, db=db, socket_timeout=1).ping())
    except Exception:
        return False


def forget_redis_keys(db: int, prefix: str) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


def config_for(broker: str, target: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": target,
        "result_backend": None,
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": f"lateness-{secrets.token_hex(3)}",
        "worker_hijack_root_logger": False,
    }
    if broker == "redis":
        config["broker_transport_options"] = {
            "global_keyprefix": f"cpq-late-{secrets.token_hex(4)}:"
        }
    return config


def one_round(broker: str, target: str, n: int, workdir: Path) -> list[float]:
    """Start a worker, publish ``n`` countdown tasks, return each start's lateness (s)."""
    config = config_for(broker, target)
    record = workdir / f"{broker}-{secrets.token_hex(3)}.txt"
    module = f"lateness_{secrets.token_hex(3)}"
    (workdir / f"{module}.py").write_text(APP.format(config=json.dumps(config), record=str(record)))
    env = {**os.environ, "PYTHONPATH": f"{workdir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(workdir / f"{module}.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", module, "worker", "-P", "prefork", "-c", "2",
         "-l", "info", "--without-heartbeat", "--without-gossip", "--without-mingle"],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b" ready." not in (workdir / f"{module}.log").read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((workdir / f"{module}.log").read_text()[-3000:])
            time.sleep(0.1)
        time.sleep(1.0)  # idle: waiting on its socket, not in its start-up claims
        sender = Celery(f"{module}-sender", set_as_current=False)
        sender.conf.update(config)
        rng = random.Random(7)
        etas: dict[str, float] = {}
        with sender.producer_or_acquire() as producer:
            for _ in range(n):
                # What countdown=... becomes: an absolute eta from this clock.
                eta = datetime.now(UTC) + timedelta(seconds=rng.uniform(1.0, 3.0))
                sent = sender.send_task("lateness.noop", eta=eta, producer=producer)
                etas[sent.id] = eta.timestamp()
                time.sleep(0.05)
        sender.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if record.exists() and len(record.read_text().splitlines()) >= n:
                break
            time.sleep(0.2)
        lines = record.read_text().splitlines() if record.exists() else []
        return [float(at) - etas[task_id] for task_id, at in (line.split() for line in lines)]
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
        log.close()
        if broker == "redis":
            forget_redis_keys(
                int(target.rsplit("/", 1)[1]),
                config["broker_transport_options"]["global_keyprefix"],
            )


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-db", type=int, default=14)
    args = parser.parse_args()
    late: dict[str, list[float]] = {}
    with scratch_database(args.url) as db_url, tempfile.TemporaryDirectory() as tmp:
        brokers = {"pgqueue": "pgqueue://" + db_url.split("://", 1)[1]}
        if redis_up(args.redis_db):
            brokers["redis"] = f"redis://127.0.0.1:6379/{args.redis_db}"
        for round_no in range(args.rounds):
            for broker, target in brokers.items():
                got = one_round(broker, target, args.n, Path(tmp))
                late.setdefault(broker, []).extend(got)
                print(f"round {round_no + 1} {broker}: {len(got)}/{args.n} started", flush=True)

    print(f"\nCountdown start lateness, {args.rounds} x {args.n} tasks per broker, idle worker;")
    print("ms after the eta the caller sent (p50 / p99 / max; min)\n")
    print("| broker | tasks | p50 | p99 | max | min |")
    print("|---|---:|---:|---:|---:|---:|")
    for broker, values in late.items():
        ms = [v * 1000 for v in values]
        print(
            f"| {broker} | {len(ms)} | {statistics.median(ms):.1f} | {quantile(ms, 0.99):.1f} "
            f"| {max(ms):.1f} | {min(ms):.1f} |"
        )


if __name__ == "__main__":
    main()
