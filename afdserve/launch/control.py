"""The control plane between the front (LLM or server) and worker processes: ZeroMQ PUSH/PULL
sockets carrying small JSON objects (requests in, token events and status out).

Hidden states never travel here (they use the data transports and the binary wire protocol);
these messages are few per step, so JSON keeps them readable and easy to validate. Every
receive takes a timeout, and a malformed message is logged and dropped, never fatal.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import zmq

log = logging.getLogger(__name__)

OPS = frozenset(
    {"hello", "ready", "add", "abort", "shutdown", "events", "error", "heartbeat", "refuse", "ping"}
)
PING_S = 1.0
"""The front pings every worker's control socket this often, so a worker can tell that the
front is gone (`afdserve worker --front-timeout-s`)."""


def encode(op: str, **fields: Any) -> bytes:
    return json.dumps({"op": op, **fields}, separators=(",", ":")).encode()


def decode(frame: bytes) -> dict[str, Any] | None:
    """The message, or None (logged) when the frame is not a JSON object with a known op."""
    try:
        msg = json.loads(frame)
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("control: dropping a frame that is not JSON (%d bytes)", len(frame))
        return None
    if not isinstance(msg, dict) or msg.get("op") not in OPS:
        log.warning("control: dropping a message with no known op: %.200r", msg)
        return None
    return msg


def recv_all(sock: zmq.Socket, timeout_s: float) -> list[dict[str, Any]]:
    """Wait up to `timeout_s` for a first message, then take every message already queued."""
    out: list[dict[str, Any]] = []
    if not sock.poll(max(0, int(timeout_s * 1000))):
        return out
    while True:
        try:
            frame = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return out
        msg = decode(frame)
        if msg is not None:
            out.append(msg)


def send(sock: zmq.Socket, op: str, timeout_s: float = 5.0, **fields: Any) -> None:
    """Send one message, waiting at most `timeout_s` for the peer to take it."""
    deadline = time.monotonic() + timeout_s
    frame = encode(op, **fields)
    while True:
        try:
            sock.send(frame, zmq.NOBLOCK)
            return
        except zmq.Again:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"control: peer did not take a {op!r} message within {timeout_s}s"
                ) from None
            time.sleep(0.001)
