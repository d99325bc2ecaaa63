"""`shm`: same-host transport over shared-memory rings, with Unix datagrams as the doorbell.

Per ordered pair (sender s -> receiver d) there is one ring of `ring_bytes` in a /dev/shm file
that s creates and d maps read-only. Each endpoint also binds one Unix datagram socket in the
Linux *abstract* namespace (`\\0afdserve/<session>/<rank>`: no file, gone when the process is).

- A frame up to `inline_bytes` travels whole inside one datagram (FRAME): one kernel copy each
  way, the lowest latency for control frames and small activations. A frame without a tensor
  (control frames, SYNC) always travels this way, whatever its size (only tensor bytes stream).
- A larger frame sends its prefix (header, text) as STREAM, then its tensor bytes go through the
  ring in chunks: s copies a chunk from the tensor into the ring (the one sender-side copy) and
  sends CHUNK(pos, n); d copies it from the ring straight into the received tensor (the one
  receiver-side copy) and answers CREDIT(pos + n), which frees the space for s. Chunks pipeline,
  so s and d copy at the same time, and a frame larger than the ring still streams through.
- Datagram syscalls order the ring writes before the doorbell on every architecture; no spin
  on shared counters, no memory-ordering assumptions.

recv returns a tensor the caller owns (a copy out of the ring, never a view into it).

Lifetime: s unlinks its ring file as soon as d reports it mapped (ATTACHED), during the
constructor, so a crash later leaves nothing in /dev/shm; the memory goes when both processes
have unmapped it. Files of creators that died before that point are swept by the next endpoint
created on the host, and close()/atexit unlink whatever is still owned.
"""

from __future__ import annotations

import atexit
import errno
import logging
import mmap
import os
import re
import socket
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afdserve.errors import ProtocolError, TransportTimeout, UserInputError
from afdserve.transport.base import Key, PeerUnreachable
from afdserve.transport.buffers import RecvBufferPool
from afdserve.transport.options import TransportOptions, check_positive
from afdserve.transport.protocol import (
    FrameHeader,
    Message,
    decode,
    decode_header,
    decode_parts,
    encode_parts,
    encode_prefix,
)
from afdserve.transport.pump import PumpedTransport

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "afdserve-"
_SESSION_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# Envelope kinds: the first byte of every datagram.
FRAME = 1  # + a whole codec frame
STREAM = 2  # + <QQ> ring position and size of the first chunk + the frame prefix
CHUNK = 3  # + <QQ> ring position, byte count: more of the frame being streamed
CREDIT = 4  # + <Q> receiver consumed the sender's ring up to this position (sent lazily)
HELLO = 5  # + <IQ> rank, ring bytes + UTF-8 path of the ring the sender created for us
ATTACHED = 6  # + <I> rank: "I mapped your ring; unlink it"
BYE = 7  # + <I> rank: the endpoint is closing
PING = 8  # nothing: a liveness probe (the kernel refuses it if the peer's socket is gone)

_CHUNK = struct.Struct("<QQ")
_CREDIT = struct.Struct("<Q")
_HELLO = struct.Struct("<IQ")
_RANK = struct.Struct("<I")
_KIND = [bytes([k]) for k in range(9)]
_DELIVERS = (FRAME, CHUNK, STREAM)  # the envelopes that can complete a message
_MAX_DGRAM = 1 << 20


@dataclass(frozen=True)
class ShmOptions(TransportOptions):
    session: str = ""
    """Group name shared by every rank (letters, digits, `._-`). Empty: derived from
    `rendezvous` (the address itself is never contacted)."""
    ring_bytes: int = 2 << 20
    """Ring size per ordered peer pair. Small on purpose: a ring that stays in the caches
    streams several times faster than one that goes through DRAM (dev box, 16 MiB frames:
    4.6 GB/s through a 2 MiB ring, 0.7 GB/s through 16 MiB); larger frames stream through."""
    chunk_bytes: int = 512 << 10
    """Streaming granularity: the sender and receiver copy concurrently chunk by chunk."""
    inline_bytes: int = 32 << 10
    """Frames up to this size travel whole in the notification datagram."""

    def __post_init__(self) -> None:
        super().__post_init__()
        session = self.session or _session_from(self.rendezvous)
        if not _SESSION_RE.match(session):
            raise UserInputError(f"shm session must be 1-64 of [A-Za-z0-9_.-], got {session!r}")
        object.__setattr__(self, "session", session)
        for name in ("ring_bytes", "chunk_bytes", "inline_bytes"):
            check_positive(name, getattr(self, name), integer=True)
        if self.ring_bytes < 4096:
            raise UserInputError(f"ring_bytes must be at least 4096, got {self.ring_bytes}")
        if self.chunk_bytes > self.ring_bytes // 2:
            object.__setattr__(self, "chunk_bytes", self.ring_bytes // 2)
        if self.inline_bytes > 200_000:
            raise UserInputError(
                f"inline_bytes must be at most 200000 (datagram limit), got {self.inline_bytes}"
            )


def _session_from(rendezvous: str) -> str:
    if not rendezvous:
        raise UserInputError(
            "the shm transport needs `session` (or `rendezvous` to derive it from)"
        )
    return re.sub(r"[^A-Za-z0-9_.-]", "_", rendezvous)


def socket_name(session: str, rank: int) -> bytes:
    return f"\0afdserve/{session}/{rank}".encode()


class _OutRing:
    """Sender side of one ring: we write, the peer reads and returns credits."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)  # [size]
        self.head = 0  # bytes published (monotonic)
        self.credited = 0  # bytes the peer has consumed (monotonic)
        self.lock = threading.Lock()  # one streaming frame at a time per peer
        self.attached = False

    def free(self) -> int:
        return self.size - (self.head - self.credited)

    def unlink(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:  # a numpy view is still alive somewhere; the GC will unmap
            pass


class _InRing:
    """Receiver side of one ring: the peer writes, we copy out and return credits."""

    def __init__(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != size:
                raise ProtocolError(
                    f"ring {path} is {os.fstat(fd).st_size} bytes, HELLO said {size}"
                )
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.path = path
        self.size = size
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)  # [size], read-only
        self.expected = 0  # next ring position we expect a CHUNK for
        self.credited = 0  # the position we last sent a CREDIT for
        self.header: FrameHeader | None = None  # the frame being streamed in
        self.prefix = b""
        self.dest: np.ndarray | None = None  # from the endpoint's RecvBufferPool
        self.filled = 0
        self.credit_due: int | None = None  # a CREDIT that could not be sent yet

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]
        self.dest = None
        try:
            self.mm.close()
        except BufferError:
            pass


class ShmTransport(PumpedTransport):
    """One endpoint of a same-host group. The constructor returns once every peer is connected
    both ways (or raises TransportTimeout at `connect_timeout_s`)."""

    def __init__(
        self, rank: int, world_size: int, options: ShmOptions | None = None, **kwargs: object
    ) -> None:
        opts = options if options is not None else ShmOptions(**kwargs)  # type: ignore[arg-type]
        self.peers = opts.peer_ranks(rank, world_size)
        super().__init__(rank, world_size)
        self.options = opts
        self.spin_s = opts.spin_s
        self._addr = {r: socket_name(opts.session, r) for r in range(world_size)}
        self._rank_of = {a: r for r, a in self._addr.items() if r in self.peers}
        self._out: dict[int, _OutRing] = {}
        self._in: dict[int, _InRing] = {}
        self._dead: dict[int, str] = {}  # peer -> why it is known to be gone
        self._pool = RecvBufferPool()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            try:
                self._sock.bind(self._addr[rank])
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise UserInputError(
                        f"shm session {opts.session!r} already has a live rank {rank} on this host"
                    ) from None
                raise
            self._sock.setblocking(False)
            sweep_stale_segments()
            for p in self.peers:
                path = SHM_DIR / f"{SEGMENT_PREFIX}{opts.session}-{rank}to{p}-{os.getpid()}"
                self._out[p] = _OutRing(path, opts.ring_bytes)
            _register_cleanup(self)
            self._handshake(time.monotonic() + opts.connect_timeout_s)
        except BaseException:
            self._teardown()
            self._abandon()
            raise
        self._start_pump(f"afd-shm-pump-{rank}")

    # -- connection setup ----------------------------------------------------------------------

    def _handshake(self, deadline: float) -> None:
        """HELLO every peer until it has mapped our ring, and map every peer's ring."""
        next_hello = 0.0
        while True:
            self._drain()
            missing_out = [p for p, ring in self._out.items() if not ring.attached]
            missing_in = [p for p in self.peers if p not in self._in]
            if not missing_out and not missing_in:
                return
            now = time.monotonic()
            if now > deadline:
                raise TransportTimeout(
                    f"shm rank {self.rank} (session {self.options.session!r}): peers "
                    f"{sorted(set(missing_out) | set(missing_in))} did not connect within "
                    f"{self.options.connect_timeout_s:.1f}s"
                )
            if now >= next_hello:
                for p in missing_out:
                    ring = self._out[p]
                    self._try_send(
                        p,
                        [_KIND[HELLO], _HELLO.pack(self.rank, ring.size), str(ring.path).encode()],
                    )
                next_hello = now + 0.05
            self._wait_ready(0.01, 0)

    # -- sending -------------------------------------------------------------------------------

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
            frame = _KIND[FRAME] + encode_prefix(msg, sender=self.rank)
            if len(frame) > _MAX_DGRAM:
                raise ProtocolError(
                    f"a frame of {len(frame)} bytes without a tensor does not fit "
                    f"in one shm datagram ({_MAX_DGRAM} bytes)"
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
        if 1 + len(prefix) + n <= self.options.inline_bytes:
            self._send_blocking(
                dst, [_KIND[FRAME], prefix, payload] if n else [_KIND[FRAME], prefix]
            )
            return
        ring = self._out[dst]
        src = np.frombuffer(payload, dtype=np.uint8)  # [n]
        chunk = self.options.chunk_bytes
        deadline = time.monotonic() + self.options.send_timeout_s
        with ring.lock:
            off = 0
            while off < n:
                want = min(n - off, chunk)
                if (
                    ring.free() < want
                    and self._wait_for(lambda w=want: True if ring.free() >= w else None, deadline)
                    is None
                ):
                    raise TransportTimeout(
                        f"shm rank {self.rank}: rank {dst} consumed nothing for "
                        f"{self.options.send_timeout_s:.1f}s (ring full)"
                    )
                pos = ring.head
                at = pos % ring.size
                k = min(want, ring.size - at)  # never wrap inside a chunk
                ring.buf[at : at + k] = src[off : off + k]
                ring.head = pos + k
                # the first chunk rides with the frame's prefix: one datagram for most frames
                parts = (
                    [_KIND[STREAM], _CHUNK.pack(pos, k), prefix]
                    if off == 0
                    else [_KIND[CHUNK], _CHUNK.pack(pos, k)]
                )
                self._send_blocking(dst, parts, deadline)
                off += k

    def _peer_gone(self, peer: int) -> str | None:
        if peer not in self._dead:
            try:
                self._sock.sendmsg([_KIND[PING]], (), 0, self._addr[peer])
            except (ConnectionRefusedError, FileNotFoundError):
                self._dead[peer] = "its socket is gone: the process exited or died"
            except OSError:  # queue full or we are closing: no verdict
                pass
        return self._dead.get(peer)

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

    # -- receiving (pump lock held) ------------------------------------------------------------

    def _fds(self) -> list[int]:
        return [self._sock.fileno()]

    def _drain(self) -> int:
        return self._drain_for(None)

    def _drain_for(self, key: Key | None) -> int:
        """`_drain`, stopping early once a frame delivered `key` (saves the final empty read)."""
        handled = 0
        for p, ring in self._in.items():  # credits that found the peer's queue full earlier
            due = ring.credit_due
            if due is not None and self._try_send(p, [_KIND[CREDIT], _CREDIT.pack(due)]):
                ring.credited, ring.credit_due = max(ring.credited, due), None
        while True:
            try:
                data, addr = self._sock.recvfrom(_MAX_DGRAM)
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
            if key is not None and data[0] in _DELIVERS and self.mailbox.has(key):
                return handled

    def _handle(self, src: int, data: bytes) -> None:
        if not data:
            raise ProtocolError("empty datagram")
        kind = data[0]
        body = memoryview(data)[1:]
        if kind == FRAME:
            msg = decode(body)
            self._deliver(src, msg)
        elif kind == CHUNK:
            self._on_chunk(src, body)
        elif kind == STREAM:
            ring = self._need_in(src)
            if len(body) < _CHUNK.size:
                raise ProtocolError("malformed STREAM")
            if ring.header is not None:
                log.warning(
                    "shm rank %d: rank %d started a new frame before finishing one", self.rank, src
                )
                ring.header = ring.dest = None
            prefix = body[_CHUNK.size :]
            try:
                header = decode_header(prefix)
                if len(prefix) != header.prefix_len or not header.tensor_nbytes:
                    raise ProtocolError(
                        f"STREAM prefix of {len(prefix)} bytes does not fit its header"
                    )
            except ProtocolError:
                try:  # consume (and credit) its first chunk anyway, then report the prefix
                    self._on_chunk(src, body[: _CHUNK.size])
                except ProtocolError:
                    pass
                raise
            ring.header, ring.prefix, ring.filled = header, bytes(prefix), 0
            ring.dest = self._pool.take(header.tensor_nbytes)
            self._on_chunk(src, body[: _CHUNK.size])
        elif kind == CREDIT:
            if len(body) != _CREDIT.size or src not in self._out:
                raise ProtocolError("malformed CREDIT")
            (pos,) = _CREDIT.unpack(body)
            out = self._out[src]
            if pos > out.head:
                raise ProtocolError(f"CREDIT {pos} beyond the {out.head} bytes written")
            out.credited = max(out.credited, pos)
        elif kind == HELLO:
            if len(body) <= _HELLO.size:
                raise ProtocolError("malformed HELLO")
            peer, size = _HELLO.unpack_from(body)
            path = str(body[_HELLO.size :], "utf-8", errors="strict")
            expected = f"{SHM_DIR}/{SEGMENT_PREFIX}{self.options.session}-{src}to{self.rank}-"
            if peer != src or not path.startswith(expected) or size < 4096:
                raise ProtocolError(f"HELLO from rank {src} names rank {peer} / ring {path!r}")
            if src not in self._in:
                try:
                    self._in[src] = _InRing(path, size)
                except FileNotFoundError:  # already unlinked: we mapped it before and forgot? drop
                    raise ProtocolError(f"ring {path} of rank {src} does not exist") from None
            self._try_send(src, [_KIND[ATTACHED], _RANK.pack(self.rank)])
        elif kind == ATTACHED:
            if len(body) != _RANK.size or src not in self._out:
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

    def _need_in(self, src: int) -> _InRing:
        ring = self._in.get(src)
        if ring is None:
            raise ProtocolError(f"rank {src} streamed before its HELLO")
        return ring

    def _on_chunk(self, src: int, body: memoryview) -> None:
        ring = self._need_in(src)
        if len(body) != _CHUNK.size:
            raise ProtocolError("malformed CHUNK")
        pos, n = _CHUNK.unpack(body)
        at = pos % ring.size
        if n == 0 or at + n > ring.size or pos < ring.expected:
            raise ProtocolError(
                f"CHUNK ({pos}, {n}) is outside the ring or repeats (expected {ring.expected})"
            )
        if pos != ring.expected:
            log.warning(
                "shm rank %d: rank %d skipped ring bytes %d..%d", self.rank, src, ring.expected, pos
            )
        ring.expected = pos + n
        try:
            if ring.header is None or ring.dest is None:
                raise ProtocolError(f"CHUNK of {n} bytes from rank {src} belongs to no frame")
            if ring.filled + n > len(ring.dest):
                ring.header = ring.dest = None
                raise ProtocolError(f"rank {src} streamed more bytes than its frame holds")
            ring.dest[ring.filled : ring.filled + n] = ring.buf[at : at + n]
            ring.filled += n
            if ring.filled == len(ring.dest):
                header, prefix, tensor = ring.header, ring.prefix, ring.dest
                ring.header = ring.dest = None
                self._deliver(src, decode_parts(header, prefix, tensor))
        finally:  # consumed (or discarded): the space is the sender's again
            if ring.expected - ring.credited >= ring.size // 4:
                # lazily: a sender waits only for <= ring/2 free bytes, which it always has
                # while less than a quarter of the ring is consumed but not yet credited
                if self._try_send(src, [_KIND[CREDIT], _CREDIT.pack(ring.expected)]):
                    ring.credited, ring.credit_due = ring.expected, None
                else:
                    ring.credit_due = ring.expected

    def _deliver(self, src: int, msg: Message) -> None:
        if msg.sender != src:
            raise ProtocolError(f"frame from rank {src} claims sender {msg.sender}")
        self.mailbox.put(msg)

    # -- teardown ------------------------------------------------------------------------------

    def _close_backend(self) -> None:
        for p in self.peers:
            self._try_send(p, [_KIND[BYE], _RANK.pack(self.rank)])
        self._teardown()

    def _teardown(self) -> None:
        for ring in self._out.values():
            ring.unlink()
            ring.close()
        for ring in self._in.values():
            ring.close()
        self._out.clear()
        self._in.clear()
        self._sock.close()


# -- cleanup of segments that outlive their creator ----------------------------------------------

_SEGMENT_RE = re.compile(rf"^{SEGMENT_PREFIX}.+-\d+to\d+-(\d+)$")


def sweep_stale_segments(directory: Path = SHM_DIR) -> list[Path]:
    """Unlink ring files whose creating process no longer exists; returns what was removed."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _SEGMENT_RE.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            (directory / name).unlink()
            removed.append(directory / name)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _register_cleanup(transport: ShmTransport) -> None:
    """Unlink this endpoint's ring files at interpreter exit if close() was never called."""
    ref = weakref.ref(transport)

    def cleanup() -> None:
        t = ref()
        if t is not None:
            for ring in list(t._out.values()):
                ring.unlink()

    atexit.register(cleanup)
    weakref.finalize(transport, atexit.unregister, cleanup)
