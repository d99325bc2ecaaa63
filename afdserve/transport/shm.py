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

Here: the options, the endpoint's construction, connection handshake and teardown. The halves
of the protocol are `shm_send` and `shm_receive`, the rings' bookkeeping is `shm_ring`, the
datagram kinds `shm_envelope`, and the ring files' names and sweep `shm_segments`.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import socket
import time
import weakref
from dataclasses import dataclass

from afdserve.errors import TransportTimeout, UserInputError
from afdserve.transport.buffers import RecvBufferPool
from afdserve.transport.options import TransportOptions, check_positive
from afdserve.transport.shm_envelope import BYE, HELLO, HELLO_HEAD, KIND, RANK
from afdserve.transport.shm_receive import ShmReceiving
from afdserve.transport.shm_ring import InRing, OutRing
from afdserve.transport.shm_segments import SHM_DIR, ring_name_prefix, sweep_stale_segments
from afdserve.transport.shm_send import ShmSending

_SESSION_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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
        if self.epoch:  # a rebuilt group: fresh sockets and rings
            session = f"{session[:56]}.e{self.epoch}"
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


class ShmTransport(ShmSending, ShmReceiving):
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
        self._out: dict[int, OutRing] = {}
        self._in: dict[int, InRing] = {}
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
                path = SHM_DIR / f"{ring_name_prefix(opts.session, rank, p)}{os.getpid()}"
                self._out[p] = OutRing(path, opts.ring_bytes)
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
                        [
                            KIND[HELLO],
                            HELLO_HEAD.pack(self.rank, ring.size),
                            str(ring.path).encode(),
                        ],
                    )
                next_hello = now + 0.05
            self._wait_ready(0.01, 0)

    # -- inspection ----------------------------------------------------------------------------

    def inbound(self, peer: int) -> InRing:
        """The ring `peer` writes to this endpoint (inspection: metrics and tests)."""
        return self._in[peer]

    def outbound(self, peer: int) -> OutRing:
        """The ring this endpoint writes to `peer` (inspection: metrics and tests)."""
        return self._out[peer]

    # -- teardown ------------------------------------------------------------------------------

    def _close_backend(self) -> None:
        for p in self.peers:
            self._try_send(p, [KIND[BYE], RANK.pack(self.rank)])
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
