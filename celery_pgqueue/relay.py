"""The pool process's side of batched completions: hand a finish to the node's writer.

A prefork pool process that wrote its own finishes kept a server connection open for
them: a ``-c 8`` node held 8 of them. Instead it sends each finish over an abstract
Unix datagram socket to the completion writer in the worker's main process
(:mod:`celery_pgqueue.completions`), which writes the finishes of tasks that ended
close together as one statement, and waits for the reply: Celery hears of the task's
end (and acks a late-acked task) only once its state is committed, exactly as when
the process wrote it itself. Any doubt (no writer, a message too large for one
datagram, no reply, the main process gone) and the process writes the finish itself,
as before: a finish is fenced and idempotent, so a second write changes nothing.

Messages are JSON carrying the node's secret token (made at random in the main
process, inherited by fork): another local process can reach an abstract socket, so
nothing it sends without the token is written, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from time import monotonic, sleep
from typing import Any

from celery_pgqueue.states import JobStatus, LogStatus
from celery_pgqueue.store.batches import Finish

logger = logging.getLogger("celery_pgqueue")

MAX_DATAGRAM = 60_000
"""Largest finish sent through the relay; a larger one is written by the process itself."""

REPLY_WAIT = 35.0
"""Seconds to wait for the writer's reply (it retries a restarting server for 30 s)."""

RESEND_AFTER = 1.0
"""Seconds without a reply after which a finish is sent again (the writer may have died
with it and been restarted; a live one drops the copy)."""

RESTART_GRACE = 0.5
"""Seconds a send refused (no writer bound) is tried again: the main process restarts a
dead writer within milliseconds, and a pool process that wrote its own finish meanwhile
would keep a connection open for good."""

DOWN_FOR = 5.0
"""Seconds a pool process writes its finishes itself, without trying, after the writer
stayed away for :data:`RESTART_GRACE`."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a node's completion writer listens, and the token it expects."""

    address: bytes
    token: str
    owner: int
    """The main process's pid: a pool process whose parent changed writes itself."""


def encode(token: str, request: int, finish: Finish) -> bytes:
    """One finish as a datagram."""
    return json.dumps(
        {
            "t": token,
            "r": request,
            "id": str(finish.job_id),
            "a": finish.attempt,
            "s": finish.status.value,
            "l": None if finish.log_status is None else finish.log_status.value,
            "v": finish.result,
            "m": finish.max_attempts,
            "e": finish.error_message,
            "g": finish.log_message,
            "n": finish.notify,
        },
        separators=(",", ":"),
        allow_nan=False,
    ).encode()


def encode_stop(token: str) -> bytes:
    """The main process's "write what has arrived, then exit" to its writer."""
    return json.dumps({"t": token, "stop": True}, separators=(",", ":")).encode()


STOP = "stop"
"""What :func:`decode` returns for the main process's stop message."""


def decode(data: bytes, token: str) -> tuple[int, Finish] | str | None:
    """(request number, finish) from a datagram, :data:`STOP` for the main process's stop
    message; None for anything not ours. One parse per datagram (the writer's hot path)."""
    try:
        m = json.loads(data)
        if not isinstance(m, dict) or m.get("t") != token:
            return None
        if m.get("stop") is True:
            return STOP
        return int(m["r"]), Finish(
            job_id=uuid.UUID(m["id"]),
            attempt=None if m["a"] is None else int(m["a"]),
            status=JobStatus(m["s"]),
            log_status=None if m["l"] is None else LogStatus(m["l"]),
            result=m["v"],
            max_attempts=None if m["m"] is None else int(m["m"]),
            error_message=m["e"],
            log_message=m["g"],
            notify=bool(m["n"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


class RelayClient:
    """A pool process's connection to its node's completion writer."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._request = 0
        self._down_until = 0.0

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind("")  # autobind: an abstract address of our own, for the reply
            self._sock = sock
        return self._sock

    def send(self, finish: Finish) -> bool | None:
        """Have the writer record ``finish``: whether the row changed once committed,
        or None when the caller must write it itself."""
        if os.getppid() != self.endpoint.owner or monotonic() < self._down_until:
            return None
        with self._lock:
            self._request += 1
            request = self._request
            try:
                data = encode(self.endpoint.token, request, finish)
            except (TypeError, ValueError):
                return None
            if len(data) > MAX_DATAGRAM:
                return None
            try:
                sock = self._socket()
                self._send(sock, data)
                return self._reply(sock, request, data)
            except OSError as exc:
                logger.debug("pgqueue relay unavailable, writing the finish here: %s", exc)
                self.close()
                return None

    def _send(self, sock: socket.socket, data: bytes) -> None:
        """Send ``data`` to the writer, waiting out a restart; OSError if it stays away."""
        deadline = monotonic() + RESTART_GRACE
        while True:
            try:
                sock.sendto(data, self.endpoint.address)
                return
            except ConnectionRefusedError:
                if monotonic() >= deadline or os.getppid() != self.endpoint.owner:
                    self._down_until = monotonic() + DOWN_FOR
                    raise
                sleep(0.01)

    def _reply(self, sock: socket.socket, request: int, data: bytes) -> bool | None:
        deadline = monotonic() + REPLY_WAIT
        while (left := deadline - monotonic()) > 0:
            sock.settimeout(min(RESEND_AFTER, left))
            try:
                answer = sock.recv(256)
            except TimeoutError:
                if os.getppid() != self.endpoint.owner:
                    return None  # the main process died: nobody will answer
                # Again: a writer restarted after a crash never got it (a copy reaching
                # a live writer that still holds it is dropped there). No writer at
                # all refuses it (OSError): the caller then writes the finish itself.
                self._send(sock, data)
                continue
            number, _, outcome = answer.decode().partition(" ")
            if number != str(request):
                continue  # a late answer to a request we gave up on
            return {"1": True, "0": False}.get(outcome)
        return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_client: RelayClient | None = None
_endpoint: Endpoint | None = None


def serve_at(endpoint: Endpoint | None) -> None:
    """Set (in the main process, before forking) where this node's pool processes send."""
    global _endpoint, _client
    _endpoint, _client = endpoint, None


def client() -> RelayClient | None:
    """This pool process's relay client, or None when it writes its finishes itself."""
    global _client
    endpoint = _endpoint
    if endpoint is None or endpoint.owner == os.getpid():
        return None
    if _client is None or _client.endpoint is not endpoint:
        _client = RelayClient(endpoint)
    return _client


def reply(sock: socket.socket, address: Any, request: int, written: bool | None) -> None:
    """The writer's answer: ``1`` written, ``0`` fenced out, ``-`` write it yourself."""
    outcome = "-" if written is None else "1" if written else "0"
    try:
        sock.sendto(f"{request} {outcome}".encode(), address)
    except OSError:
        pass  # that process is gone or gave up waiting: it writes the finish itself
