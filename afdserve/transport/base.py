"""The one transport interface every backend implements, and the keyed mailbox behind it.

A worker holds one `Transport` endpoint. `send` hands a message to the backend and returns
without waiting for the peer. `recv` waits for the message with a given key (sender, type, step,
layer, microbatch) until a deadline and raises `TransportTimeout` past it: no wait across workers
is ever unbounded. Messages may arrive in any order; the mailbox keeps them until asked for.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from afdserve.errors import TransportClosed, TransportTimeout
from afdserve.transport.drop_log import DropLog
from afdserve.transport.message import Message, MsgType

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Key = tuple[int, int, int, int, int]


def make_key(src: int, type_: MsgType, step: int, layer: int = 0, microbatch: int = 0) -> Key:
    return (src, int(type_), step, layer, microbatch)


class Mailbox:
    """Messages that arrived, keyed by Message.key, with deadline-bounded waits.

    One plain lock guards the dict; `put` notifies the condition only when a thread blocks in
    `take`/`wait_any` (pumped transports poll `try_take` instead, so usually nobody does).
    """

    def __init__(self) -> None:
        self._items: dict[Key, Message] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sleepers = 0  # threads in _cond.wait (guarded by _lock)
        self._closed = False

    def put(self, msg: Message) -> None:
        key = (msg.sender, int(msg.type), msg.step, msg.layer, msg.microbatch)  # msg.key
        with self._lock:
            self._items[key] = msg
            if self._sleepers:
                self._cond.notify_all()

    def _sleep(self, timeout_s: float) -> None:
        """Wait on the condition (lock held) for at most `timeout_s`."""
        self._sleepers += 1
        try:
            self._cond.wait(timeout_s)
        finally:
            self._sleepers -= 1

    def take(self, key: Key, timeout_s: float) -> Message:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            while key not in self._items:
                if self._closed:
                    raise TransportClosed(f"transport closed while waiting for {_describe(key)}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportTimeout(
                        f"timed out after {timeout_s:.3f}s waiting for {_describe(key)}"
                    )
                self._sleep(remaining)
            return self._items.pop(key)

    def take_until(self, key: Key, deadline: float) -> Message | None:
        """The keyed message, waiting until `deadline` (time.monotonic); None past it."""
        try:
            return self.take(key, deadline - time.monotonic())
        except TransportTimeout:
            return None

    def drop_older_than_for(self, src: int, step: int) -> int:
        """Forget messages from rank `src` of steps before `step` (abandoned by their sender)."""
        with self._lock:
            stale = [k for k in self._items if k[0] == src and k[2] < step]
            for k in stale:
                del self._items[k]
            return len(stale)

    def replace(self, old: Message, new: Message) -> bool:
        """Put `new` in the place of `old` if `old` is still waiting here (same key)."""
        key = old.key
        with self._lock:
            if self._items.get(key) is not old:
                return False
            self._items[key] = new
            return True

    def try_take(self, key: Key) -> Message | None:
        """The keyed message if it is there, else None (never waits)."""
        with self._lock:
            return self._items.pop(key, None)

    def has(self, key: Key) -> bool:
        with self._lock:
            return key in self._items

    def wait_any(self, types: frozenset[int], timeout_s: float) -> list[Key]:
        """Wait until a message of one of `types` is here (or the deadline passes, or close);
        return the keys of all such messages, oldest first (possibly none)."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            while True:
                keys = [k for k in self._items if k[1] in types]
                if keys or self._closed:
                    return keys
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._sleep(remaining)

    def drop_older_than(self, step: int) -> int:
        """Forget messages of steps before `step` (late arrivals nobody waits for any more)."""
        with self._lock:
            stale = [k for k in self._items if k[2] < step]
            for k in stale:
                del self._items[k]
            return len(stale)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class PeerUnreachable(TransportTimeout):
    """The peer is known to be gone (its endpoint refused or dropped the connection).

    Raised early instead of waiting out a deadline; it is a TransportTimeout so callers that
    treat "peer slow or dead" alike need one except clause.
    """


def _describe(key: Key) -> str:
    src, type_, step, layer, mb = key
    return f"{MsgType(type_).name} from rank {src} (step {step}, layer {layer}, microbatch {mb})"


class Transport(ABC):
    """One worker's endpoint. Backends implement `send` and feed arrivals into `self.mailbox`."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.mailbox = Mailbox()
        self._drops = DropLog(log, f"{type(self).__name__} rank {rank}")

    def _drop(self, why: str, exc: BaseException | None = None) -> None:
        """Count and log (rate-limited) a frame this endpoint will not deliver, and keep serving.
        `exc`: not malformed input but an unexpected error while handling it (a bug), which
        must not kill the receiving thread either; it is logged with its traceback."""
        self._drops.record(why, exc)

    @property
    def dropped_frames(self) -> int:
        """Frames dropped as malformed, oversized, from unknown or unauthenticated senders, or
        claiming another sender (for metrics and tests)."""
        return self._drops.count

    def carries(self, device: torch.device) -> bool:
        """Whether tensors on `device` travel as they are. Host transports (the default) carry
        host memory only: they copy a device tensor to host memory when sending it, and deliver
        host tensors, which the receiver moves to its own device. Callers holding a device tensor
        for several sends stage it once themselves."""
        return device.type == "cpu"

    @abstractmethod
    def send(self, dst: int, msg: Message) -> None:
        """Hand `msg` to the backend for rank `dst`; the caller must not modify its tensor after."""

    def recv(
        self,
        src: int,
        type_: MsgType,
        step: int,
        layer: int = 0,
        microbatch: int = 0,
        *,
        timeout_s: float,
    ) -> Message:
        """Wait for the keyed message until `timeout_s` passes; raise TransportTimeout then."""
        return self.mailbox.take(make_key(src, type_, step, layer, microbatch), timeout_s)

    def poll(
        self, src: int, type_: MsgType, step: int, layer: int = 0, microbatch: int = 0
    ) -> bool:
        return self.mailbox.has(make_key(src, type_, step, layer, microbatch))

    def close(self) -> None:
        self.mailbox.close()
