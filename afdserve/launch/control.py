"""The control plane's sockets: ZeroMQ PUSH/PULL between the front (LLM or server) and worker
processes, carrying the typed messages of `messages.py` (requests in, token events and status
out).

Every receive takes a timeout and every send a deadline; a malformed frame comes back as a
`Malformed` (logged), never as an exception, so a worker that receives garbage keeps serving.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from afdserve.launch.messages import Codec, FrontMessage, WorkerMessage, encode

PING_S = 1.0
"""The front pings every worker's control socket this often, so a worker can tell that the
front is gone (`afdserve worker --front-timeout-s`)."""

TO_WORKER = Codec(FrontMessage)
"""What a worker decodes (its configuration, requests, aborts, pings, shutdown)."""
TO_FRONT = Codec(WorkerMessage)
"""What the front decodes (ready, step outputs, heartbeats, errors)."""


def recv_all(sock: zmq.Socket, timeout_s: float, codec: Codec) -> list[Any]:
    """Wait up to `timeout_s` for a first frame, then take every frame already queued; each
    decoded by `codec` (a message, or a `Malformed`)."""
    out: list[Any] = []
    if not sock.poll(max(0, int(timeout_s * 1000))):
        return out
    while True:
        try:
            frame = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return out
        out.append(codec.decode(frame))


def send(sock: zmq.Socket, msg: Any, timeout_s: float = 5.0) -> None:
    """Send one message, waiting at most `timeout_s` for the peer to take it."""
    deadline = time.monotonic() + timeout_s
    frame = encode(msg)
    while True:
        try:
            sock.send(frame, zmq.NOBLOCK)
            return
        except zmq.Again:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"control: peer did not take a {type(msg).__name__} message within {timeout_s}s"
                ) from None
            time.sleep(0.001)
