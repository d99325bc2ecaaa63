"""The sending half of the shm transport: frames inline in a datagram, PLACED whole in a ring
stretch, or STREAMed through the ring in chunks (see `shm` for when each), and the datagram
socket's send side (back-off while the peer's queue is full, liveness probes).

A base of `shm.ShmTransport`, whose constructor sets the state declared below.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from afdserve.errors import ProtocolError, TransportTimeout
from afdserve.transport.base import PeerUnreachable
from afdserve.transport.codec import encode_parts, encode_prefix
from afdserve.transport.message import Message
from afdserve.transport.pump import PumpedTransport
from afdserve.transport.shm_envelope import (
    CHUNK,
    FRAME,
    KIND,
    MAX_DGRAM,
    NEED,
    PING,
    PLACED,
    SPAN,
    STREAM,
)
from afdserve.transport.shm_ring import OutRing

if TYPE_CHECKING:
    from afdserve.transport.shm import ShmOptions

_MIN_CHUNK = 4096  # a streamed chunk takes a smaller stretch only when no chunk-sized one is free
_STREAM_WINDOW_CHUNKS = 4  # a streamed frame has at most this many chunks not yet freed
_PLACE_WAIT_S = 0.005  # then a frame that finds no contiguous stretch streams through pieces


class ShmSending(PumpedTransport):
    """Everything an shm endpoint sends: frames to peers, and the envelopes of its own rings."""

    options: ShmOptions
    peers: tuple[int, ...]
    _sock: socket.socket
    _addr: dict[int, bytes]
    """Socket address of every rank."""
    _out: dict[int, OutRing]
    _dead: dict[int, str]
    """Peer -> why it is known to be gone."""

    def send(self, dst: int, msg: Message) -> None:
        """Send `msg` to `dst`. Returns once the frame is in the peer's socket queue or ring
        (the receiver copies out asynchronously). Raises PeerUnreachable if dst's endpoint is
        gone, TransportTimeout if dst does not drain within send_timeout_s."""
        self._check_open()
        if dst not in self._out:
            raise ValueError(f"rank {self.rank} cannot send to {dst}: peers are {list(self.peers)}")
        if msg.tensor is None:
            # Frames without a tensor (control frames, SYNC) travel whole in one datagram: only
            # tensor bytes can stream through the ring.
            frame = KIND[FRAME] + encode_prefix(msg, sender=self.rank)
            self.options.check_frame_len(len(frame) - 1, dst)
            if len(frame) > MAX_DGRAM:
                raise ProtocolError(
                    f"a frame of {len(frame)} bytes without a tensor does not fit "
                    f"in one shm datagram ({MAX_DGRAM} bytes)"
                )
            try:
                self._sock.sendto(frame, self._addr[dst])
                return
            except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
                pass  # queue full or peer gone: the slow path waits or reports
            except OSError as e:
                if e.errno == errno.EMSGSIZE:
                    raise ProtocolError(
                        f"a frame of {len(frame)} bytes without a tensor is "
                        "larger than this host's datagram limit"
                    ) from None
                raise
            self._send_blocking(dst, [frame])
            return
        prefix, payload = encode_parts(msg, sender=self.rank)
        n = len(payload)
        self.options.check_frame_len(len(prefix) + n, dst)
        if 1 + len(prefix) + n <= self.options.inline_bytes:
            self._send_blocking(dst, [KIND[FRAME], prefix, payload] if n else [KIND[FRAME], prefix])
            return
        ring = self._out[dst]
        src = np.frombuffer(payload, dtype=np.uint8)  # [n]
        deadline = time.monotonic() + self.options.send_timeout_s
        with ring.lock:
            if n <= ring.size // 8:
                self._send_placed(dst, ring, prefix, src, deadline)
            else:
                self._send_streamed(dst, ring, prefix, src, deadline)

    def _wait_space(
        self, dst: int, take: Callable[[], tuple[int, int] | None], deadline: float
    ) -> tuple[int, int] | None:
        """A stretch of the ring from `take` (see OutRing.alloc), waiting for FREEs until
        `deadline` (None then)."""
        got = take()
        if got is None:
            self._send_blocking(dst, [KIND[NEED]], deadline)  # flush your pending FREEs
            got = self._wait_for(take, deadline)
        return got

    def _ring_full(self, dst: int) -> TransportTimeout:
        return TransportTimeout(
            f"shm rank {self.rank}: rank {dst} freed no ring space for "
            f"{self.options.send_timeout_s:.1f}s (it is not receiving)"
        )

    def _send_placed(
        self, dst: int, ring: OutRing, prefix: bytes, src: np.ndarray, deadline: float
    ) -> None:
        """The whole tensor into one contiguous stretch of the ring, then one datagram."""
        n = len(src)
        place_by = min(deadline, time.monotonic() + _PLACE_WAIT_S)
        got = self._wait_space(dst, lambda: ring.alloc(n, n), place_by)
        if got is None:  # the free space is in pieces (the peer holds tensors): stream it
            self._send_streamed(dst, ring, prefix, src, deadline)
            return
        off = got[0]
        ring.buf[off : off + n] = src
        self._send_blocking(dst, [KIND[PLACED], SPAN.pack(off, n), prefix], deadline)

    def _send_streamed(
        self, dst: int, ring: OutRing, prefix: bytes, src: np.ndarray, deadline: float
    ) -> None:
        n = len(src)
        chunk = self.options.chunk_bytes
        window = _STREAM_WINDOW_CHUNKS * chunk
        unfreed: list[tuple[int, int]] = []  # chunks of this frame the peer has not freed yet
        done = 0
        while done < n:
            want = min(n - done, chunk)

            # a bounded run-ahead keeps the chunks in a few cache-warm stretches of the ring
            # (and lets the receiver copy each one while it is still in the shared cache)
            def room(want: int = want) -> tuple[int, int] | None:
                unfreed[:] = [(o, k) for o, k in unfreed if ring.busy.get(o) == k]
                if sum(k for _, k in unfreed) + want > window:
                    return None
                return ring.alloc(want, min(want, _MIN_CHUNK))

            got = self._wait_space(dst, room, deadline)
            if got is None:
                raise self._ring_full(dst)
            off, k = got
            unfreed.append(got)
            ring.buf[off : off + k] = src[done : done + k]
            # the first chunk rides with the frame's prefix: one datagram for most frames
            parts = (
                [KIND[STREAM], SPAN.pack(off, k), prefix]
                if done == 0
                else [KIND[CHUNK], SPAN.pack(off, k)]
            )
            self._send_blocking(dst, parts, deadline)
            done += k

    def _try_send(self, dst: int, parts: list) -> bool:
        """One non-blocking datagram; False if dst's queue is full or it is not bound (yet)."""
        try:
            self._sock.sendmsg(parts, (), 0, self._addr[dst])
            return True
        except OSError:  # queue full, peer not bound (yet / any more), or we are closing
            return False

    def _send_blocking(self, dst: int, parts: list, deadline: float | None = None) -> None:
        addr = self._addr[dst]
        delay = 10e-6
        while True:
            try:
                self._sock.sendmsg(parts, (), 0, addr)
                return
            except BlockingIOError:  # dst's queue is full: take in our own input, back off
                pass
            except (ConnectionRefusedError, FileNotFoundError):
                self._dead[dst] = "its socket is gone: the process exited or died"
                raise PeerUnreachable(
                    f"shm rank {self.rank}: rank {dst} is unreachable (its endpoint closed or its process died)"
                ) from None
            self._check_open()
            if deadline is None:
                deadline = time.monotonic() + self.options.send_timeout_s
            if time.monotonic() > deadline:
                raise TransportTimeout(
                    f"shm rank {self.rank}: rank {dst} did not drain its socket within {self.options.send_timeout_s:.1f}s"
                )
            if self._pump_lock.acquire(blocking=False):
                try:
                    handled = self._drain()
                finally:
                    self._pump_lock.release()
                if handled:
                    self._handed_over(0)
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    def _peer_gone(self, peer: int) -> str | None:
        if peer not in self._dead:
            try:
                self._sock.sendmsg([KIND[PING]], (), 0, self._addr[peer])
            except (ConnectionRefusedError, FileNotFoundError):
                self._dead[peer] = "its socket is gone: the process exited or died"
            except OSError:  # queue full or we are closing: no verdict
                pass
        return self._dead.get(peer)
