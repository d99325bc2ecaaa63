"""`shm`: same-host transport over shared-memory rings, with Unix datagrams as the doorbell.

Per ordered pair (sender s -> receiver d) there is one ring of `ring_bytes` in a /dev/shm file
that s creates and d maps. Each endpoint also binds one Unix datagram socket in the Linux
*abstract* namespace (`\\0afdserve/<session>/<rank>`: no file, gone when the process is).

- A frame up to `inline_bytes` travels whole inside one datagram (FRAME): one kernel copy each
  way, the lowest latency for control frames and small activations. A frame without a tensor
  (control frames, SYNC) always travels this way, whatever its size (only tensor bytes use rings).
- A frame whose tensor fits in an eighth of the ring is PLACED: s copies the tensor bytes into a
  free contiguous stretch of the ring (the only copy) and sends the frame's prefix (header,
  text) with the stretch's offset. d hands out a tensor that *is* that stretch (zero-copy
  receive, writable) and tells s the stretch is FREE once every reference to that tensor, and
  to any view of it, is gone: CPython's reference count says when, through a weakref on the
  per-frame buffer object that every such view keeps alive.
- A larger frame streams: its prefix goes as STREAM, then its tensor bytes go through the ring
  in chunks: s copies a chunk into a free stretch and sends CHUNK(offset, n); d copies it into
  the received tensor and frees the stretch. Chunks pipeline, so s and d copy at the same
  time, and a frame larger than the ring still streams through.
- Datagram syscalls order the ring writes before the doorbell on every architecture; no spin
  on shared counters, no memory-ordering assumptions.

Space: s allocates stretches lowest-offset first and d frees them in any order, so a tensor
a caller keeps costs only its own bytes. Views never hold more than half the ring: past that, d
first copies out the tensors of messages still waiting in its mailbox (nobody has them yet),
then copies new frames out instead of viewing them. FREEs go lazily (once two chunks' worth or an eighth
of the ring is due), and at once when s, short of space, sends NEED. A PLACED frame that finds no
contiguous stretch for a few milliseconds streams through the free pieces instead.

Lifetime: s unlinks its ring file as soon as d reports it mapped (ATTACHED), during the
constructor, so a crash later leaves nothing in /dev/shm; the memory goes when both processes
have unmapped it (a tensor handed out keeps its mapping alive, even past close()). Files of
creators that died before that point are swept by the next endpoint created on the host, and
close()/atexit unlink whatever is still owned.
"""

from __future__ import annotations

import atexit
import ctypes
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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afdserve.errors import ProtocolError, TransportTimeout, UserInputError
from afdserve.transport.base import Key, PeerUnreachable
from afdserve.transport.buffers import RecvBufferPool
from afdserve.transport.codec import decode, encode_parts, encode_prefix
from afdserve.transport.message import Message
from afdserve.transport.options import TransportOptions, check_positive
from afdserve.transport.protocol import FrameHeader, decode_header, decode_parts
from afdserve.transport.pump import PumpedTransport

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "afdserve-"
_SESSION_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# Envelope kinds: the first byte of every datagram.
FRAME = 1  # + a whole codec frame
STREAM = 2  # + <QQ> ring position and size of the first chunk + the frame prefix
CHUNK = 3  # + <QQ> ring position, byte count: more of the frame being streamed
FREE = 4  # + <QQ> pairs: ring stretches (offset, bytes) the receiver is done with (lazily)
HELLO = 5  # + <IQ> rank, ring bytes + UTF-8 path of the ring the sender created for us
ATTACHED = 6  # + <I> rank: "I mapped your ring; unlink it"
BYE = 7  # + <I> rank: the endpoint is closing
PING = 8  # nothing: a liveness probe (the kernel refuses it if the peer's socket is gone)
PLACED = 9  # + <QQ> ring offset and size of the whole tensor + the frame prefix
NEED = 10  # nothing: the sender waits for ring space (send the pending FREEs now)

_CHUNK = struct.Struct("<QQ")
_HELLO = struct.Struct("<IQ")
_RANK = struct.Struct("<I")
_KIND = [bytes([k]) for k in range(11)]
_DELIVERS = (FRAME, CHUNK, STREAM, PLACED)  # the envelopes that can complete a message
_MAX_DGRAM = 1 << 20
_MIN_CHUNK = 4096  # a streamed chunk takes a smaller stretch only when no chunk-sized one is free
_STREAM_WINDOW_CHUNKS = 4  # a streamed frame has at most this many chunks not yet freed
_PLACE_WAIT_S = 0.005  # then a frame that finds no contiguous stretch streams through pieces


@dataclass(frozen=True)
class ShmOptions(TransportOptions):
    session: str = ""
    """Group name shared by every rank (letters, digits, `._-`). Empty: derived from
    `rendezvous` (the address itself is never contacted)."""
    ring_bytes: int = 16 << 20
    """Ring size per ordered peer pair, reserved in /dev/shm when the endpoint starts. Tensors
    up to ring_bytes / 8 (2 MiB by default: a 256-token x 4096 bf16 microbatch) are received
    in place; larger ones stream through in chunks."""
    chunk_bytes: int = 512 << 10
    """Streaming granularity: the sender and receiver copy concurrently chunk by chunk
    (at most ring_bytes / 4)."""
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
        if self.chunk_bytes > self.ring_bytes // 4:
            object.__setattr__(self, "chunk_bytes", self.ring_bytes // 4)
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
    """Sender side of one ring: we place tensor bytes, the peer frees what it is done with.

    `busy` maps the offset of every stretch placed and not yet freed to its length. New
    stretches go to the lowest free offset that fits: stretches freed a moment ago are reused
    while they are still in the caches (measured on the dev box, 1 MiB frames: the sender's
    copy took ~40 us this way and ~125 us cycling through a 16 MiB ring), and a stretch the
    peer holds on to costs only its own bytes.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:  # reserve the pages now: a full /dev/shm is a clear error here, not a SIGBUS later
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                os.close(fd)
                fd = -1
                path.unlink()
                raise UserInputError(
                    f"cannot reserve a {size >> 10} KiB shm ring in {SHM_DIR} ({e.strerror}): "
                    "free space there or lower ring_bytes"
                ) from None
            self.mm = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            if fd >= 0:
                os.close(fd)
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)  # [size]
        self.busy: dict[int, int] = {}  # offset -> bytes, placed and not freed yet
        self.busy_bytes = 0
        self.lock = threading.Lock()  # one frame at a time per peer
        self._space = threading.Lock()  # busy: alloc (sender) vs free (pump)
        self.attached = False

    def alloc(self, want: int, least: int) -> tuple[int, int] | None:
        """A free stretch of `least` to `want` bytes as (offset, length), or None."""
        with self._space:
            return self._alloc_locked(want, least)

    def _alloc_locked(self, want: int, least: int) -> tuple[int, int] | None:
        if self.size - self.busy_bytes < least:
            return None
        gaps, prev = [], 0
        for off, n in sorted(self.busy.items()):
            if off > prev:
                gaps.append((prev, off))
            prev = off + n
        if prev < self.size:
            gaps.append((prev, self.size))
        # the lowest gap that takes `want` (freed stretches are reused while still in cache),
        # else the largest one that takes `least`
        fit = next(((lo, hi) for lo, hi in gaps if hi - lo >= want), None)
        if fit is None and gaps:
            fit = max(gaps, key=lambda g: g[1] - g[0])
        if fit is None or fit[1] - fit[0] < least:
            return None
        lo, k = fit[0], min(want, fit[1] - fit[0])
        self.busy[lo] = k
        self.busy_bytes += k
        return lo, k

    def free(self, off: int, n: int) -> None:
        with self._space:
            if self.busy.get(off) != n:
                raise ProtocolError(f"FREE of ring bytes ({off}, {n}), which are not in use")
            del self.busy[off]
            self.busy_bytes -= n

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


class _Held:
    """A PLACED frame handed out as a view of the ring: the weakref whose callback frees it,
    and (while it may still sit in the mailbox) the message that carries it."""

    __slots__ = ("ref", "nbytes", "msg")

    def __init__(self, ref: weakref.ref, nbytes: int) -> None:
        self.ref = ref
        self.nbytes = nbytes
        self.msg: weakref.ref[Message] | None = None


class _InRing:
    """Receiver side of one ring: the peer places tensor bytes; we view or copy them out and
    tell it which stretches are free again.

    Mapped read-write: a tensor received in place is the caller's to modify. `inuse` holds the
    stretches received and not yet freed, `held` those handed out as views (by offset).
    `release` may run on any thread (wherever the last reference to a view is dropped).
    """

    def __init__(
        self, path: str, size: int, send_free: Callable[[list], bool], lazy_bytes: int
    ) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != size:
                raise ProtocolError(
                    f"ring {path} is {os.fstat(fd).st_size} bytes, HELLO said {size}"
                )
            self.mm = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)
        self.path = path
        self.size = size
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)  # [size]
        self.header: FrameHeader | None = None  # the frame being streamed in
        self.prefix = b""
        self.dest: np.ndarray | None = None  # from the endpoint's RecvBufferPool
        self.filled = 0
        self.lock = threading.Lock()  # guards everything below
        self.inuse: dict[int, int] = {}  # offset -> bytes
        self.held: dict[int, _Held] = {}
        self.held_bytes = 0
        self.released: deque[int] = deque()  # offsets of views let go of (any thread)
        self.to_free: list[int] = []  # flat (offset, bytes) pairs not yet sent
        self.to_free_bytes = 0
        self.wanted = False  # the sender waits for space: send FREEs at once
        self._send_free = send_free
        self.lazy_bytes = lazy_bytes  # FREEs wait until this many bytes are due

    def claim(self, off: int, n: int, what: str) -> None:
        """Record ring bytes [off, off + n) as received; the sender must not reuse them yet."""
        if n <= 0 or off < 0 or off + n > self.size:
            raise ProtocolError(f"{what} ({off}, {n}) is outside the {self.size}-byte ring")
        with self.lock:
            for o, k in self.inuse.items():
                if o < off + n and off < o + k:
                    raise ProtocolError(
                        f"{what} ({off}, {n}) overlaps ring bytes ({o}, {k}) still in use"
                    )
            self.inuse[off] = n

    def view(self, off: int, n: int) -> np.ndarray | None:
        """Ring bytes [off, off + n) (claimed) as a writable array, or None when views already
        hold half the ring.

        The array's buffer is a per-frame ctypes object; the weakref on it fires when the last
        array or tensor over those bytes is gone (numpy and torch keep the buffer's owner alive
        through every view), and only then are the bytes freed for the sender.
        """
        with self.lock:
            if self.held_bytes + n > self.size // 2:
                return None
            raw = (ctypes.c_uint8 * n).from_buffer(self.mm, off)
            self.held[off] = _Held(weakref.ref(raw, lambda _, o=off: self.release(o)), n)
            self.held_bytes += n
        return np.frombuffer(raw, dtype=np.uint8)  # [n], writable

    def done(self, off: int) -> None:
        """Claimed bytes at `off` were copied out (or dropped): free them (lazily)."""
        with self.lock:
            self._free_locked(off)
        self.settle()

    def release(self, off: int) -> None:
        self.released.append(off)
        self.settle()

    def _free_locked(self, off: int) -> None:
        n = self.inuse.pop(off, 0)
        if n:
            self.to_free += (off, n)
            self.to_free_bytes += n

    def settle(self, wanted: bool = False) -> None:
        """Free released views and send the pending FREEs once `lazy_bytes` are due, or at
        once while the sender waits for space. Any thread."""
        while True:
            if not self.lock.acquire(blocking=False):
                return  # the holder settles (it looks at `released` again after unlocking)
            try:
                self.wanted |= wanted
                while self.released:
                    off = self.released.popleft()
                    held = self.held.pop(off, None)
                    if held is not None:
                        self.held_bytes -= held.nbytes
                    self._free_locked(off)
                if self.to_free and (self.wanted or self.to_free_bytes >= self.lazy_bytes):
                    if self._send_free(self.to_free):
                        self.to_free, self.to_free_bytes, self.wanted = [], 0, False
                    else:
                        self.wanted = True  # the peer's queue is full: retry on the next drain
            finally:
                self.lock.release()
            if not self.released:
                return

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]
        self.dest = None
        try:
            self.mm.close()
        except BufferError:  # tensors received in place still use it: unmapped when they go
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

    def inbound(self, peer: int) -> _InRing:
        """The ring `peer` writes to this endpoint (inspection: metrics and tests)."""
        return self._in[peer]

    def outbound(self, peer: int) -> _OutRing:
        """The ring this endpoint writes to `peer` (inspection: metrics and tests)."""
        return self._out[peer]

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
        deadline = time.monotonic() + self.options.send_timeout_s
        with ring.lock:
            if n <= ring.size // 8:
                self._send_placed(dst, ring, prefix, src, deadline)
            else:
                self._send_streamed(dst, ring, prefix, src, deadline)

    def _wait_space(
        self, dst: int, take: Callable[[], tuple[int, int] | None], deadline: float
    ) -> tuple[int, int] | None:
        """A stretch of the ring from `take` (see _OutRing.alloc), waiting for FREEs until
        `deadline` (None then)."""
        got = take()
        if got is None:
            self._send_blocking(dst, [_KIND[NEED]], deadline)  # flush your pending FREEs
            got = self._wait_for(take, deadline)
        return got

    def _ring_full(self, dst: int) -> TransportTimeout:
        return TransportTimeout(
            f"shm rank {self.rank}: rank {dst} freed no ring space for "
            f"{self.options.send_timeout_s:.1f}s (it is not receiving)"
        )

    def _send_placed(
        self, dst: int, ring: _OutRing, prefix: bytes, src: np.ndarray, deadline: float
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
        self._send_blocking(dst, [_KIND[PLACED], _CHUNK.pack(off, n), prefix], deadline)

    def _send_streamed(
        self, dst: int, ring: _OutRing, prefix: bytes, src: np.ndarray, deadline: float
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
                [_KIND[STREAM], _CHUNK.pack(off, k), prefix]
                if done == 0
                else [_KIND[CHUNK], _CHUNK.pack(off, k)]
            )
            self._send_blocking(dst, parts, deadline)
            done += k

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
        for ring in self._in.values():  # FREEs that found the peer's queue full earlier
            if ring.wanted and ring.to_free:
                ring.settle()
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
        elif kind == PLACED:
            self._on_placed(src, body)
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
        elif kind == FREE:
            if not body or len(body) % _CHUNK.size or src not in self._out:
                raise ProtocolError("malformed FREE")
            out = self._out[src]
            for off, n in _CHUNK.iter_unpack(body):
                out.free(off, n)
        elif kind == NEED:
            ring = self._in.get(src)
            if ring is not None:
                ring.settle(wanted=True)
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
                    lazy = min(size // 8, 2 * self.options.chunk_bytes)
                    self._in[src] = _InRing(path, size, self._free_sender(src), lazy)
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

    def _on_placed(self, src: int, body: memoryview) -> None:
        """A whole tensor at ring bytes [off, off + n): hand it out in place, or copy it out
        when views already hold half the ring."""
        ring = self._need_in(src)
        if len(body) < _CHUNK.size:
            raise ProtocolError("malformed PLACED")
        off, n = _CHUNK.unpack_from(body)
        ring.claim(off, n, "PLACED")
        viewed = False
        try:
            prefix = body[_CHUNK.size :]
            header = decode_header(prefix)
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

    def _copy_out_waiting(self, ring: _InRing) -> None:
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
        if len(body) != _CHUNK.size:
            raise ProtocolError("malformed CHUNK")
        off, n = _CHUNK.unpack(body)
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
            return self._try_send(src, [_KIND[FREE], struct.pack(f"<{len(pairs)}Q", *pairs)])

        return send

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
