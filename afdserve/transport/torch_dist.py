"""`torch`: torch.distributed point-to-point over gloo, rendezvous through a TCPStore.

The group's ranks build one ProcessGroupGloo (not the global default group, so a worker can
still use torch.distributed for anything else) on the rendezvous store; gloo connects every
pair while constructing, so the constructor is the connect barrier.

Gloo matches a send with a recv per (peer, tag), in order. Each frame is therefore sent as:

1. a fixed 512-byte control tensor on tag 1: `<4sIIIQ` = b"AFDC", kind (1 frame, 2 bye),
   prefix length L, 0, tensor bytes N; then the first min(L, 488) prefix bytes;
2. if L > 488, the rest of the prefix as one more tensor on tag 1;
3. if N > 0, the tensor's raw bytes as a uint8 tensor on tag 2, received straight into the
   buffer that becomes the received tensor (no extra copy).

A dedicated receiver thread per peer posts those receives back to back (gloo needs a matching
pair for every send), so the sender never waits for the application; a sender thread per peer
makes `send` non-blocking. A gloo receive cannot be interrupted locally (abort()/shutdown() do
not wake it, and a timed-out wait closes the pair), so a receiver thread ends when its peer
says goodbye on close or its connection drops; the threads are daemons either way.

GPU tensors travel through host memory (gloo); NCCL is not implemented here.
"""

from __future__ import annotations

import datetime
import logging
import queue
import struct
import threading
import time
from dataclasses import dataclass

import torch

from afdserve.errors import ProtocolError, TransportClosed, TransportTimeout, UserInputError
from afdserve.transport.base import PeerUnreachable, Transport, _describe, make_key
from afdserve.transport.buffers import RecvBufferPool
from afdserve.transport.codec import encode_prefix
from afdserve.transport.message import Message, MsgType
from afdserve.transport.options import TransportOptions
from afdserve.transport.protocol import decode_header, decode_parts
from afdserve.transport.rendezvous import Rendezvous
from afdserve.transport.tensor_bytes import tensor_u8

log = logging.getLogger(__name__)

CTRL_BYTES = 512
_CTRL = struct.Struct("<4sIIIQ")
_CTRL_MAGIC = b"AFDC"
_INLINE_PREFIX = CTRL_BYTES - _CTRL.size
_KIND_FRAME, _KIND_BYE = 1, 2
_TAG_CTRL, _TAG_DATA = 1, 2
_FOREVER = datetime.timedelta(days=365)
_STOP = object()


@dataclass(frozen=True)
class TorchDistOptions(TransportOptions):
    backend: str = "gloo"
    """Only gloo is implemented (CPU; GPU tensors are staged through host memory)."""
    gloo_host: str = ""
    """Address gloo binds and advertises. Empty: 127.0.0.1 when the rendezvous host is a
    loopback address (a single-host group), else gloo's default (this host's name)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rendezvous:
            raise UserInputError(
                "the torch transport needs `rendezvous` (HOST:PORT of rank 0's store)"
            )
        if self.backend != "gloo":
            raise UserInputError(
                f"torch transport backend {self.backend!r} is not supported: only 'gloo' is implemented "
                "(GPU tensors are staged through host memory)"
            )


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class TorchDistTransport(Transport):
    def __init__(
        self, rank: int, world_size: int, options: TorchDistOptions | None = None, **kwargs: object
    ) -> None:
        import torch.distributed as dist

        opts = options if options is not None else TorchDistOptions(**kwargs)  # type: ignore[arg-type]
        self.peers = opts.peer_ranks(rank, world_size)
        super().__init__(rank, world_size)
        self.options = opts
        self._closed = False
        self._dead: dict[int, str] = {}  # peer -> why we consider it gone
        self._pool = RecvBufferPool()
        self._rdv = Rendezvous(
            opts.rendezvous,
            rank,
            world_size,
            opts.connect_timeout_s,
            f"afd/torch/e{opts.epoch}",
            host_store=not opts.external_store,
        )
        gloo_opts = dist.ProcessGroupGloo._Options()
        gloo_opts._timeout = datetime.timedelta(
            seconds=opts.connect_timeout_s
        )  # connect; waits pass their own
        gloo_opts._threads = 2
        host = opts.gloo_host or ("127.0.0.1" if _is_loopback(self._rdv.host) else "")
        gloo_opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        try:
            self._pg = dist.ProcessGroupGloo(
                dist.PrefixStore(f"pg/e{opts.epoch}", self._rdv.store), rank, world_size, gloo_opts
            )
        except RuntimeError as e:
            self._rdv.close()
            raise TransportTimeout(
                f"torch rank {rank}: gloo could not connect the group: {e}"
            ) from None
        self._queues: dict[int, queue.SimpleQueue] = {p: queue.SimpleQueue() for p in self.peers}
        self._threads: list[threading.Thread] = []
        for p in self.peers:
            for target, name in ((self._recv_loop, "recv"), (self._send_loop, "send")):
                t = threading.Thread(
                    target=target, args=(p,), name=f"afd-torch-{name}-{rank}-{p}", daemon=True
                )
                t.start()
                self._threads.append(t)

    # -- sending -------------------------------------------------------------------------------

    def send(self, dst: int, msg: Message) -> None:
        """Queue `msg` for dst's sender thread and return; do not modify its tensor after.

        Raises PeerUnreachable once a send to dst has failed (its connection dropped).
        """
        if self._closed:
            raise TransportClosed(f"torch rank {self.rank}: transport is closed")
        q = self._queues.get(dst)
        if q is None:
            raise ValueError(f"rank {self.rank} cannot send to {dst}: peers are {list(self.peers)}")
        if dst in self._dead:
            raise PeerUnreachable(
                f"torch rank {self.rank}: rank {dst} is unreachable: {self._dead[dst]}"
            )
        prefix = encode_prefix(msg, sender=self.rank)
        data = tensor_u8(msg.tensor) if msg.tensor is not None else None
        n = 0 if data is None else data.numel()
        self.options.check_frame_len(len(prefix) + n, dst)
        ctrl = torch.zeros(CTRL_BYTES, dtype=torch.uint8)
        head = _CTRL.pack(_CTRL_MAGIC, _KIND_FRAME, len(prefix), 0, n) + prefix[:_INLINE_PREFIX]
        ctrl[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        extra = None
        if len(prefix) > _INLINE_PREFIX:
            extra = torch.frombuffer(bytearray(prefix[_INLINE_PREFIX:]), dtype=torch.uint8)
        q.put((ctrl, extra, data if n else None))

    def _send_loop(self, peer: int) -> None:
        q = self._queues[peer]
        timeout = datetime.timedelta(seconds=self.options.send_timeout_s)
        while True:
            item = q.get()
            if item is _STOP:
                return
            if peer in self._dead:
                continue  # drop: send() already raises for this peer
            try:
                works = [
                    self._pg.send([t], peer, tag)
                    for t, tag in zip(item, (_TAG_CTRL, _TAG_CTRL, _TAG_DATA), strict=True)
                    if t is not None
                ]
                for w in works:
                    w.wait(timeout)
            except RuntimeError as e:
                self._mark_dead(peer, f"send failed: {e}")

    # -- receiving -----------------------------------------------------------------------------

    def _recv_loop(self, peer: int) -> None:
        while not self._closed:
            try:
                ctrl = torch.empty(CTRL_BYTES, dtype=torch.uint8)
                self._pg.recv([ctrl], peer, _TAG_CTRL).wait(_FOREVER)
                raw = ctrl.numpy().tobytes()
                magic, kind, plen, _, n = _CTRL.unpack_from(raw)
                if (
                    magic != _CTRL_MAGIC
                    or kind not in (_KIND_FRAME, _KIND_BYE)
                    or plen + n > self.options.max_frame_bytes
                ):
                    # Gloo carries no framing of its own: a receiver that does not post exactly
                    # the receives the sender's frame needs is out of step with the stream for
                    # good, and one that posted what an oversized block asks would allocate it.
                    # So this peer's stream ends here: it is marked gone (its sends and waits
                    # fail with PeerUnreachable), the other peers are served on.
                    self._mark_dead(
                        peer,
                        f"malformed control block (magic {magic!r}, kind {kind}, {plen} prefix + "
                        f"{n} tensor bytes, max_frame_bytes {self.options.max_frame_bytes}); "
                        "its stream is closed",
                    )
                    return
                if kind == _KIND_BYE:
                    self._mark_dead(peer, "it closed its endpoint")
                    return
                prefix = raw[_CTRL.size : _CTRL.size + min(plen, _INLINE_PREFIX)]
                if plen > _INLINE_PREFIX:
                    extra = torch.empty(plen - _INLINE_PREFIX, dtype=torch.uint8)
                    self._pg.recv([extra], peer, _TAG_CTRL).wait(_FOREVER)
                    prefix += extra.numpy().tobytes()
                data = None
                if n:
                    data = torch.from_numpy(self._pool.take(n))
                    self._pg.recv([data], peer, _TAG_DATA).wait(_FOREVER)
            except (RuntimeError, MemoryError) as e:  # the connection dropped (peer died), we
                # are closing, or the announced bytes found no memory (then out of step)
                if not self._closed:
                    self._mark_dead(peer, f"connection lost: {type(e).__name__}: {e}")
                return
            try:  # the bytes the control block announced are in: the stream is in step
                header = decode_header(prefix, self.options.max_frame_bytes)
                if header.prefix_len != plen or header.tensor_nbytes != n:
                    raise ProtocolError(
                        f"control block says {plen}+{n} bytes, header {header.prefix_len}+{header.tensor_nbytes}"
                    )
                if header.sender != peer:
                    raise ProtocolError(f"frame from rank {peer} claims sender {header.sender}")
                self.mailbox.put(decode_parts(header, prefix, data))
            except ProtocolError as e:
                self._drop(f"from rank {peer}: {e}")
            except Exception as e:  # a bug, not bad input: this peer's receiver thread goes on
                self._drop(f"from rank {peer}", e)

    def _mark_dead(self, peer: int, why: str) -> None:
        if peer not in self._dead:
            self._dead[peer] = why
            if not self._closed:
                log.warning(
                    "torch rank %d: rank %d is gone: %s", self.rank, peer, why.splitlines()[0][:200]
                )

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
        """Wait for the keyed message. TransportTimeout at the deadline; PeerUnreachable as soon
        as src's connection is known lost and the message has not arrived."""
        key = make_key(src, type_, step, layer, microbatch)
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self.mailbox.take(key, min(max(remaining, 0.0), 0.05))
            except TransportTimeout:
                if src in self._dead and not self.mailbox.has(key):
                    raise PeerUnreachable(
                        f"torch rank {self.rank}: rank {src} is gone ({self._dead[src].splitlines()[0][:200]}) "
                        f"while waiting for {_describe(key)}"
                    ) from None
                if remaining <= 0:
                    raise TransportTimeout(
                        f"torch rank {self.rank}: timed out after {timeout_s:.3f}s waiting for {_describe(key)}"
                    ) from None

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Say goodbye to every peer (ending their receiver threads for us), stop our sender
        threads, wake waiters. Our receiver threads end when each peer closes or drops."""
        if self._closed:
            return
        for p in self.peers:
            if p not in self._dead:
                ctrl = torch.zeros(CTRL_BYTES, dtype=torch.uint8)
                ctrl[: _CTRL.size] = torch.frombuffer(
                    bytearray(_CTRL.pack(_CTRL_MAGIC, _KIND_BYE, 0, 0, 0)), dtype=torch.uint8
                )
                self._queues[p].put((ctrl, None, None))
            self._queues[p].put(_STOP)
        self._closed = True
        self.mailbox.close()
        deadline = time.monotonic() + 2.0
        for t in self._threads:
            if t.name.startswith("afd-torch-send"):
                t.join(max(deadline - time.monotonic(), 0.0))
        # receivers: wait (same deadline) for the goodbyes of peers closing at the same time.
        # A receiver still blocked in gloo when the process exits makes it abort ("terminate
        # called without an active exception", SIGABRT): with a 0.2 s grace, attention workers
        # of a group of 3+ did so on most shutdowns, before their FFN worker had closed.
        for t in self._threads:
            if t.name.startswith("afd-torch-recv"):
                t.join(max(deadline - time.monotonic(), 0.0))
        self._rdv.close()
