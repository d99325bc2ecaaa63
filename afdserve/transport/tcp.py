"""`tcp`: ZeroMQ over TCP, for hosts without shared memory or RDMA.

Each endpoint binds one PULL socket (a random port on `bind_host` unless `port` is given) and
publishes its address through the rendezvous store; it connects one PUSH socket to every peer.
A frame is a two-part ZeroMQ message [prefix, tensor bytes]: the tensor part is sent from the
tensor's memory without a copy (ZeroMQ keeps a reference until it is on the wire), and received
into a ZeroMQ-owned buffer that becomes the received tensor's storage when it is suitably
aligned (else it is copied once).

Whoever waits reads the PULL socket (pump.PumpedTransport); ZeroMQ's edge-triggered FD tells
waiters when to look.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import zmq

from afdserve.errors import ProtocolError, TransportTimeout, UserInputError
from afdserve.transport.buffers import RecvBufferPool
from afdserve.transport.codec import encode_parts
from afdserve.transport.message import Message
from afdserve.transport.options import TransportOptions
from afdserve.transport.protocol import decode_header, decode_parts
from afdserve.transport.pump import PumpedTransport
from afdserve.transport.rendezvous import Rendezvous

log = logging.getLogger(__name__)

_ALIGN = 64


@dataclass(frozen=True)
class TcpOptions(TransportOptions):
    bind_host: str = "127.0.0.1"
    """Interface the PULL socket binds (0.0.0.0 for every interface)."""
    advertise_host: str = ""
    """Host peers connect to; empty means bind_host (which must then not be 0.0.0.0)."""
    port: int = 0
    """Port to bind; 0 picks a free one."""
    send_hwm: int = 1000
    """Frames queued per peer before send back-pressures (and, past send_timeout_s, fails)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rendezvous:
            raise UserInputError(
                "the tcp transport needs `rendezvous` (HOST:PORT of rank 0's store)"
            )
        if not self.advertise_host and self.bind_host in ("0.0.0.0", "*", "::"):
            raise UserInputError(
                "bind_host is a wildcard: give advertise_host, the address peers should dial"
            )
        if (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not 0 <= self.port < 65536
        ):
            raise UserInputError(f"port must be in 0..65535, got {self.port!r}")
        if (
            isinstance(self.send_hwm, bool)
            or not isinstance(self.send_hwm, int)
            or self.send_hwm < 1
        ):
            raise UserInputError(f"send_hwm must be a positive integer, got {self.send_hwm!r}")


class TcpTransport(PumpedTransport):
    def __init__(
        self, rank: int, world_size: int, options: TcpOptions | None = None, **kwargs: object
    ) -> None:
        opts = options if options is not None else TcpOptions(**kwargs)  # type: ignore[arg-type]
        self.peers = opts.peer_ranks(rank, world_size)
        super().__init__(rank, world_size)
        self.options = opts
        self.spin_s = opts.spin_s
        self._pool = RecvBufferPool()
        self._ctx = zmq.Context(io_threads=1)
        self._push: dict[int, zmq.Socket] = {}
        self._push_locks = {p: threading.Lock() for p in self.peers}
        self._rdv: Rendezvous | None = None
        try:
            self._pull = self._ctx.socket(zmq.PULL)
            self._pull.setsockopt(zmq.LINGER, 0)
            self._pull.setsockopt(zmq.RCVHWM, 0)
            host = opts.bind_host if opts.bind_host not in ("0.0.0.0", "::") else "*"
            if opts.port:
                self._pull.bind(f"tcp://{host}:{opts.port}")
                port = opts.port
            else:
                port = self._pull.bind_to_random_port(f"tcp://{host}")
            self.address = f"tcp://{opts.advertise_host or opts.bind_host}:{port}"
            deadline = time.monotonic() + opts.connect_timeout_s
            self._rdv = Rendezvous(
                opts.rendezvous,
                rank,
                world_size,
                opts.connect_timeout_s,
                f"afd/tcp/e{opts.epoch}",
                host_store=not opts.external_store,
            )
            self._rdv.publish(f"addr/{rank}", self.address.encode())
            for p in self.peers:
                addr = self._rdv.lookup(f"addr/{p}", deadline).decode()
                sock = self._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, opts.send_hwm)
                sock.connect(addr)
                self._push[p] = sock
            self._pull_fd = self._pull.getsockopt(zmq.FD)
        except BaseException as e:
            self._teardown()
            self._abandon()
            if isinstance(e, zmq.ZMQError):
                raise UserInputError(f"tcp rank {rank}: cannot set up sockets: {e}") from None
            raise
        self._start_pump(f"afd-tcp-pump-{rank}")

    # -- sending -------------------------------------------------------------------------------

    def send(self, dst: int, msg: Message) -> None:
        """Queue `msg` for `dst` and return (ZeroMQ sends from its I/O thread). The tensor is sent
        from its own memory: do not modify it afterwards. TransportTimeout if dst's queue stays
        full for send_timeout_s (a dead or stalled peer)."""
        self._check_open()
        sock = self._push.get(dst)
        if sock is None:
            raise ValueError(f"rank {self.rank} cannot send to {dst}: peers are {list(self.peers)}")
        prefix, payload = encode_parts(msg, sender=self.rank)
        parts = [prefix, payload] if len(payload) else [prefix]
        deadline = None
        delay = 20e-6
        while True:
            with self._push_locks[dst]:
                try:
                    sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                    return
                except zmq.Again:
                    pass
            self._check_open()
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.options.send_timeout_s
            elif now > deadline:
                raise TransportTimeout(
                    f"tcp rank {self.rank}: {self.options.send_hwm} frames to rank {dst} stayed queued for "
                    f"{self.options.send_timeout_s:.1f}s (peer dead or stalled)"
                )
            time.sleep(delay)
            delay = min(delay * 2, 5e-3)

    # -- receiving (pump lock held) ------------------------------------------------------------

    def _fds(self) -> list[int]:
        return [self._pull_fd]

    def _drain(self) -> int:
        handled = 0
        try:
            if (
                not self._pull.getsockopt(zmq.EVENTS) & zmq.POLLIN
            ):  # also re-arms the edge-triggered FD
                return 0
        except zmq.ZMQError:
            if self._closed:
                return 0
            raise
        while True:
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return handled
            except zmq.ZMQError:
                if self._closed:
                    return handled
                raise
            handled += 1
            try:
                self.mailbox.put(self._decode(frames))
            except ProtocolError as e:
                self._drop(f": {e}")

    def _decode(self, frames: list[zmq.Frame]) -> Message:
        if len(frames) not in (1, 2):
            raise ProtocolError(f"a frame is 1 or 2 ZeroMQ parts, got {len(frames)}")
        prefix = frames[0].buffer
        header = decode_header(prefix)
        if len(prefix) != header.prefix_len:
            raise ProtocolError(
                f"prefix part is {len(prefix)} bytes, its header says {header.prefix_len}"
            )
        n = header.tensor_nbytes
        if (len(frames) == 2) != (n > 0) or (n and len(frames[1].buffer) != n):
            got = len(frames[1].buffer) if len(frames) == 2 else 0
            raise ProtocolError(f"tensor part is {got} bytes, the header says {n}")
        if header.sender not in self._push:
            raise ProtocolError(
                f"frame claims sender {header.sender}, not a peer of rank {self.rank}"
            )
        raw = None
        if n:
            buf = frames[1].buffer
            raw = np.frombuffer(buf, dtype=np.uint8)  # [n], zmq-owned; keeps the frame alive
            if buf.readonly or raw.ctypes.data % _ALIGN:
                dest = self._pool.take(n)
                dest[:] = raw
                raw = dest
        return decode_parts(header, prefix, raw)

    # -- teardown ------------------------------------------------------------------------------

    def _close_backend(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        for sock in self._push.values():
            sock.close(linger=0)
        self._push.clear()
        pull = getattr(self, "_pull", None)
        if pull is not None:
            pull.close(linger=0)
        self._ctx.term()
        if self._rdv is not None:
            self._rdv.close()
            self._rdv = None
