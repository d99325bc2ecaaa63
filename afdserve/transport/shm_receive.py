"""The receiving half of the shm transport: every datagram that comes in, from whole frames to
PLACED tensors handed out in place, STREAMed chunks copied out, the FREEs that give ring space
back, and the HELLO / ATTACHED / BYE of connection setup and teardown (see `shm`).

A base of `shm.ShmTransport`, whose constructor sets the state declared below. Runs with the
pump lock held (`PumpedTransport._drain`).
"""

from __future__ import annotations

import logging
import socket
import struct
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from afdserve.errors import ProtocolError
from afdserve.transport.base import Key
from afdserve.transport.buffers import RecvBufferPool
from afdserve.transport.codec import decode
from afdserve.transport.message import Message
from afdserve.transport.protocol import decode_header, decode_parts
from afdserve.transport.pump import PumpedTransport
from afdserve.transport.shm_envelope import (
    ATTACHED,
    BYE,
    CHUNK,
    DELIVERS,
    FRAME,
    FREE,
    HELLO,
    HELLO_HEAD,
    KIND,
    MAX_DGRAM,
    NEED,
    PING,
    PLACED,
    RANK,
    SPAN,
    STREAM,
)
from afdserve.transport.shm_ring import InRing, OutRing
from afdserve.transport.shm_segments import SHM_DIR, ring_name_prefix

if TYPE_CHECKING:
    from afdserve.transport.shm import ShmOptions

log = logging.getLogger(__name__)


class ShmReceiving(PumpedTransport):
    """Everything an shm endpoint receives. Sends only the small replies of the ring protocol
    (FREE, ATTACHED), through `_try_send` (`shm_send.ShmSending`)."""

    options: ShmOptions
    _sock: socket.socket
    _rank_of: dict[bytes, int]
    """Socket address of every peer -> its rank."""
    _out: dict[int, OutRing]
    _in: dict[int, InRing]
    _dead: dict[int, str]
    _pool: RecvBufferPool
    _try_send: Callable[[int, list], bool]

    def _fds(self) -> list[int]:
        return [self._sock.fileno()]

    def _drain(self) -> int:
        return self._drain_for(None)

    def _drain_for(self, key: Key | None) -> int:
        """`_drain`, stopping early once a frame delivered `key` (saves the final empty read)."""
        handled = 0
        for ring in self._in.values():  # FREEs that found the peer's queue full earlier
            if ring.wanted and ring.to_free:
                ring.settle()
        while True:
            try:
                data, addr = self._sock.recvfrom(MAX_DGRAM)
            except (BlockingIOError, InterruptedError):
                return handled
            except OSError:
                if self._closed:
                    return handled
                raise
            handled += 1
            src = self._rank_of.get(addr) if isinstance(addr, bytes) else None
            if src is None:
                self._drop(f"datagram of {len(data)} bytes from unknown address {addr!r}")
                continue
            try:
                self._handle(src, data)
            except ProtocolError as e:
                self._drop(f"from rank {src}: {e}")
                continue
            except Exception as e:  # a bug, not bad input: it must not kill a waiter or the pump
                self._drop(f"from rank {src} (kind {data[0] if data else '-'})", e)
                continue
            if key is not None and data[0] in DELIVERS and self.mailbox.has(key):
                return handled

    def _handle(self, src: int, data: bytes) -> None:
        if not data:
            raise ProtocolError("empty datagram")
        kind = data[0]
        body = memoryview(data)[1:]
        if kind == FRAME:
            if len(body) > self.options.max_frame_bytes:
                raise ProtocolError(
                    f"a frame of {len(body)} bytes exceeds max_frame_bytes "
                    f"({self.options.max_frame_bytes})"
                )
            msg = decode(body)
            self._deliver(src, msg)
        elif kind == PLACED:
            self._on_placed(src, body)
        elif kind == CHUNK:
            self._on_chunk(src, body)
        elif kind == STREAM:
            self._on_stream(src, body)
        elif kind == FREE:
            if not body or len(body) % SPAN.size or src not in self._out:
                raise ProtocolError("malformed FREE")
            out = self._out[src]
            for off, n in SPAN.iter_unpack(body):
                out.free(off, n)
        elif kind == NEED:
            ring = self._in.get(src)
            if ring is not None:
                ring.settle(wanted=True)
        elif kind == HELLO:
            self._on_hello(src, body)
        elif kind == ATTACHED:
            if len(body) != RANK.size or src not in self._out:
                raise ProtocolError("malformed ATTACHED")
            out = self._out[src]
            if not out.attached:
                out.attached = True
                out.unlink()
        elif kind == BYE:
            log.info("shm rank %d: rank %d closed its endpoint", self.rank, src)
            self._dead.setdefault(src, "it closed its endpoint")
        elif kind == PING:
            pass
        else:
            raise ProtocolError(f"unknown envelope kind {kind}")

    def _on_hello(self, src: int, body: memoryview) -> None:
        """Map the ring `src` created for us, and say so (ATTACHED: it may unlink the file)."""
        if len(body) <= HELLO_HEAD.size:
            raise ProtocolError("malformed HELLO")
        peer, size = HELLO_HEAD.unpack_from(body)
        path = str(body[HELLO_HEAD.size :], "utf-8", errors="strict")
        expected = f"{SHM_DIR}/{ring_name_prefix(self.options.session, src, self.rank)}"
        if peer != src or not path.startswith(expected) or size < 4096:
            raise ProtocolError(f"HELLO from rank {src} names rank {peer} / ring {path!r}")
        if src not in self._in:
            try:
                lazy = min(size // 8, 2 * self.options.chunk_bytes)
                self._in[src] = InRing(path, size, self._free_sender(src), lazy)
            except FileNotFoundError:  # already unlinked: we mapped it before and forgot? drop
                raise ProtocolError(f"ring {path} of rank {src} does not exist") from None
        self._try_send(src, [KIND[ATTACHED], RANK.pack(self.rank)])

    def _on_stream(self, src: int, body: memoryview) -> None:
        """The prefix of a frame to be streamed, with its first chunk."""
        ring = self._need_in(src)
        if len(body) < SPAN.size:
            raise ProtocolError("malformed STREAM")
        if ring.header is not None:
            log.warning(
                "shm rank %d: rank %d started a new frame before finishing one", self.rank, src
            )
            ring.header = ring.dest = None
        prefix = body[SPAN.size :]
        try:  # within max_frame_bytes, or nothing is allocated for it
            header = decode_header(prefix, self.options.max_frame_bytes)
            if len(prefix) != header.prefix_len or not header.tensor_nbytes:
                raise ProtocolError(f"STREAM prefix of {len(prefix)} bytes does not fit its header")
        except ProtocolError:
            try:  # consume (and credit) its first chunk anyway, then report the prefix
                self._on_chunk(src, body[: SPAN.size])
            except ProtocolError:
                pass
            raise
        ring.header, ring.prefix, ring.filled = header, bytes(prefix), 0
        ring.dest = self._pool.take(header.tensor_nbytes)
        self._on_chunk(src, body[: SPAN.size])

    def _need_in(self, src: int) -> InRing:
        ring = self._in.get(src)
        if ring is None:
            raise ProtocolError(f"rank {src} streamed before its HELLO")
        return ring

    def _on_placed(self, src: int, body: memoryview) -> None:
        """A whole tensor at ring bytes [off, off + n): hand it out in place, or copy it out
        when views already hold half the ring."""
        ring = self._need_in(src)
        if len(body) < SPAN.size:
            raise ProtocolError("malformed PLACED")
        off, n = SPAN.unpack_from(body)
        ring.claim(off, n, "PLACED")
        viewed = False
        try:
            prefix = body[SPAN.size :]
            header = decode_header(prefix, self.options.max_frame_bytes)
            if len(prefix) != header.prefix_len or header.tensor_nbytes != n:
                raise ProtocolError(
                    f"PLACED prefix of {len(prefix)} bytes / tensor of {n} bytes does not fit "
                    "its header"
                )
            data = ring.view(off, n)
            if data is None:
                self._copy_out_waiting(ring)  # messages nobody has taken yet free their bytes
                data = ring.view(off, n)
            if data is None:  # callers hold on to older tensors: copy this one out
                data = self._pool.take(n)
                data[:] = ring.buf[off : off + n]
            else:
                viewed = True
            msg = decode_parts(header, prefix, data)
            self._deliver(src, msg)
            if viewed:
                with ring.lock:
                    held = ring.held.get(off)
                    if held is not None:
                        held.msg = weakref.ref(msg)
            del msg, data
        finally:  # copied out or malformed: free now (a view frees itself when let go of)
            if not viewed:
                ring.done(off)

    def _copy_out_waiting(self, ring: InRing) -> None:
        """Replace the in-place tensors of messages still in the mailbox by copies, so that
        their ring bytes go back to the sender (pump lock held)."""
        with ring.lock:
            holds = list(ring.held.values())
        for held in holds:
            msg = held.msg() if held.msg is not None else None
            if msg is None or msg.tensor is None:
                continue
            copy = Message(msg.type, msg.step, msg.layer, msg.microbatch, msg.sender,
                           msg.tensor.clone(), msg.sync, msg.text)  # fmt: skip
            self.mailbox.replace(msg, copy)
            del msg, copy  # if the mailbox held the last reference, the view is released here

    def _on_chunk(self, src: int, body: memoryview) -> None:
        ring = self._need_in(src)
        if len(body) != SPAN.size:
            raise ProtocolError("malformed CHUNK")
        off, n = SPAN.unpack(body)
        ring.claim(off, n, "CHUNK")
        try:
            if ring.header is None or ring.dest is None:
                raise ProtocolError(f"CHUNK of {n} bytes from rank {src} belongs to no frame")
            if ring.filled + n > len(ring.dest):
                ring.header = ring.dest = None
                raise ProtocolError(f"rank {src} streamed more bytes than its frame holds")
            ring.dest[ring.filled : ring.filled + n] = ring.buf[off : off + n]
            ring.filled += n
            if ring.filled == len(ring.dest):
                header, prefix, tensor = ring.header, ring.prefix, ring.dest
                ring.header = ring.dest = None
                self._deliver(src, decode_parts(header, prefix, tensor))
        finally:  # copied out (or discarded): the space is the sender's again
            ring.done(off)

    def _free_sender(self, src: int) -> Callable[[list], bool]:
        def send(pairs: list) -> bool:
            return self._try_send(src, [KIND[FREE], struct.pack(f"<{len(pairs)}Q", *pairs)])

        return send

    def _deliver(self, src: int, msg: Message) -> None:
        if msg.sender != src:
            raise ProtocolError(f"frame from rank {src} claims sender {msg.sender}")
        self.mailbox.put(msg)
