"""`tcp`: ZeroMQ over TCP, for hosts without shared memory or RDMA.

Each endpoint binds one ROUTER socket (a random port on `bind_host` unless `port` is given) and
publishes its address through the rendezvous store; it connects one DEALER socket to every peer,
under a random routing id. A frame is a ZeroMQ message of one part [prefix] or two
[prefix, tensor bytes]: the tensor part is sent from the tensor's memory without a copy (ZeroMQ
keeps a reference until it is on the wire), and received into a ZeroMQ-owned buffer that
becomes the received tensor's storage when it is suitably aligned (else it is copied once).

Anyone who reaches the port can connect, so before a connection carries frames it runs the
handshake of `tcp_handshake` (proving the group's key when there is one), and the receiver
binds it to the rank it established: frames from connections that did not finish the handshake,
or that claim another sender, are dropped. The constructor returns once this endpoint's
connection to every peer is through its handshake (peers' connections to it are served
meanwhile, and later by the pump). libzmq closes a connection whose bytes break ZeroMQ's
framing, or that sends a part above `max_frame_bytes` (ZMQ_MAXMSGSIZE, checked before the part
is allocated); a socket monitor logs it. ZeroMQ's framing keeps message boundaries, so a
malformed frame inside a well-framed message is dropped on its own and the connection stays.

Whoever waits reads the ROUTER socket (pump.PumpedTransport); ZeroMQ's edge-triggered FD tells
waiters when to look.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from afdserve.errors import ProtocolError, TransportTimeout, UserInputError
from afdserve.transport.buffers import RecvBufferPool
from afdserve.transport.codec import encode_parts
from afdserve.transport.drop_log import DropLog
from afdserve.transport.message import Message
from afdserve.transport.options import TransportOptions
from afdserve.transport.protocol import decode_header, decode_parts
from afdserve.transport.pump import PumpedTransport
from afdserve.transport.rendezvous import Rendezvous
from afdserve.transport.tcp_handshake import (
    ClientHandshake,
    ServerGate,
    is_handshake,
    new_routing_id,
)

log = logging.getLogger(__name__)

_ALIGN = 64
_HELLO_RETRY_S = 1.0
"""A connection's handshake starts over (fresh nonce) when no reply came for this long."""
_MONITORED = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@dataclass(frozen=True)
class TcpOptions(TransportOptions):
    bind_host: str = "127.0.0.1"
    """Interface the ROUTER socket binds (0.0.0.0 for every interface)."""
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
        self._gate = ServerGate(rank, self.peers, opts.auth_key)
        self._refusals = DropLog(log, f"tcp rank {rank}", what="refused a connection")
        self._ctx = zmq.Context(io_threads=1)
        self._dealers: dict[int, zmq.Socket] = {}
        self._idents: dict[int, bytes] = {}
        self._send_locks = {p: threading.Lock() for p in self.peers}
        self._rdv: Rendezvous | None = None
        self._monitor: zmq.Socket | None = None
        try:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.setsockopt(zmq.RCVHWM, 0)
            self._router.setsockopt(zmq.MAXMSGSIZE, opts.max_frame_bytes)
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a gone id: an error
            # A reconnect under a bound routing id takes the id over even while the old TCP
            # connection's pipe is still being torn down (else the new connection is silently
            # refused and its frames are lost). Taking over needs the id: 16 secret bytes.
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._monitor = self._router.get_monitor_socket(_MONITORED)
            host = opts.bind_host if opts.bind_host not in ("0.0.0.0", "::") else "*"
            if opts.port:
                self._router.bind(f"tcp://{host}:{opts.port}")
                port = opts.port
            else:
                port = self._router.bind_to_random_port(f"tcp://{host}")
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
                sock = self._ctx.socket(zmq.DEALER)
                self._idents[p] = new_routing_id()
                sock.setsockopt(zmq.ROUTING_ID, self._idents[p])
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, opts.send_hwm)
                sock.setsockopt(zmq.MAXMSGSIZE, 4096)  # it only ever receives handshake replies
                sock.connect(addr)
                self._dealers[p] = sock
            self._router_fd = self._router.getsockopt(zmq.FD)
            self._monitor_fd = self._monitor.getsockopt(zmq.FD)
            self._connect(deadline)
        except BaseException as e:
            self._teardown()
            self._abandon()
            if isinstance(e, zmq.ZMQError):
                raise UserInputError(f"tcp rank {rank}: cannot set up sockets: {e}") from None
            raise
        self._start_pump(f"afd-tcp-pump-{rank}")

    def _connect(self, deadline: float) -> None:
        """Run this endpoint's handshake with every peer, serving the peers' handshakes with it
        meanwhile, until all of its own are through (or TransportTimeout at `deadline`; the
        ProtocolError of a peer that refused it or failed to prove the key)."""
        key = self.options.auth_key
        clients = {p: ClientHandshake(self.rank, p, key, self._idents[p]) for p in self.peers}
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        for sock in self._dealers.values():
            poller.register(sock, zmq.POLLIN)
        started = dict.fromkeys(self.peers, -float("inf"))
        while True:
            waiting = [p for p, c in clients.items() if not c.done]
            if not waiting:
                return
            now = time.monotonic()
            if now > deadline:
                raise TransportTimeout(
                    f"tcp rank {self.rank}: ranks {waiting} did not complete the connection "
                    f"handshake within {self.options.connect_timeout_s:.1f}s"
                )
            for p in waiting:
                if now - started[p] >= _HELLO_RETRY_S:  # first try, or the reply was lost
                    started[p] = now
                    try:
                        self._dealers[p].send(clients[p].hello(), zmq.NOBLOCK)
                    except zmq.Again:  # nothing queued: the next round tries again
                        started[p] = -float("inf")
            poller.poll(timeout=50)
            self._drain()
            for p in waiting:
                sock = self._dealers[p]
                while sock.poll(0):
                    reply = clients[p].on_reply(sock.recv(zmq.NOBLOCK))
                    if reply is not None:
                        sock.send(reply, zmq.NOBLOCK)
                        started[p] = time.monotonic()

    @property
    def refused_connections(self) -> int:
        """Handshakes this endpoint refused, and connections libzmq closed for broken framing."""
        return self._refusals.count

    # -- sending -------------------------------------------------------------------------------

    def send(self, dst: int, msg: Message) -> None:
        """Queue `msg` for `dst` and return (ZeroMQ sends from its I/O thread). The tensor is sent
        from its own memory: do not modify it afterwards. TransportTimeout if dst's queue stays
        full for send_timeout_s (a dead or stalled peer)."""
        self._check_open()
        sock = self._dealers.get(dst)
        if sock is None:
            raise ValueError(f"rank {self.rank} cannot send to {dst}: peers are {list(self.peers)}")
        prefix, payload = encode_parts(msg, sender=self.rank)
        self.options.check_frame_len(len(prefix) + len(payload), dst)
        parts = [prefix, payload] if len(payload) else [prefix]
        deadline = None
        delay = 20e-6
        while True:
            with self._send_locks[dst]:
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
        return [self._router_fd, self._monitor_fd]

    def _drain(self) -> int:
        handled = self._drain_monitor()
        try:
            if (
                not self._router.getsockopt(zmq.EVENTS) & zmq.POLLIN
            ):  # also re-arms the edge-triggered FD
                return handled
        except zmq.ZMQError:
            if self._closed:
                return handled
            raise
        while True:
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return handled
            except zmq.ZMQError:
                if self._closed:
                    return handled
                raise
            handled += 1
            try:
                msg = self._receive(frames)
            except ProtocolError as e:
                self._drop(f": {e}")
            except Exception as e:  # a bug, not bad input: it must not kill a waiter or the pump
                self._drop("", e)
            else:
                if msg is not None:
                    self.mailbox.put(msg)

    def _receive(self, frames: list[zmq.Frame]) -> Message | None:
        """The Message one ROUTER message delivers (None: it was a handshake step)."""
        ident, parts = frames[0].bytes, frames[1:]
        if not parts:
            raise ProtocolError("an empty message")
        rank = self._gate.rank_of(ident)
        if is_handshake(parts[0].buffer):
            if len(parts) != 1:
                raise ProtocolError(f"a handshake message of {len(parts)} parts")
            answer = self._gate.handle(ident, parts[0].bytes)
            if answer.refused:  # counted before the reply tells the connection
                self._refusals.record(f"at its handshake: {answer.refused}")
            try:
                self._router.send_multipart([ident, answer.reply], zmq.NOBLOCK)
            except zmq.ZMQError as e:  # gone meanwhile, or its queue is full: it will retry
                log.debug("tcp rank %d: handshake reply not sent: %s", self.rank, e)
            if answer.bound is not None and answer.bound != rank:
                log.debug(
                    "tcp rank %d: a connection of rank %d is through", self.rank, answer.bound
                )
            return None
        if rank is None:
            raise ProtocolError(
                f"a message of {sum(len(p.buffer) for p in parts)} bytes from a connection "
                "that has not completed the handshake"
            )
        return self._decode(rank, parts)

    def _decode(self, rank: int, frames: list[zmq.Frame]) -> Message:
        if len(frames) not in (1, 2):
            raise ProtocolError(f"a frame is 1 or 2 ZeroMQ parts, got {len(frames)}")
        prefix = frames[0].buffer
        header = decode_header(prefix, self.options.max_frame_bytes)
        if len(prefix) != header.prefix_len:
            raise ProtocolError(
                f"prefix part is {len(prefix)} bytes, its header says {header.prefix_len}"
            )
        n = header.tensor_nbytes
        if (len(frames) == 2) != (n > 0) or (n and len(frames[1].buffer) != n):
            got = len(frames[1].buffer) if len(frames) == 2 else 0
            raise ProtocolError(f"tensor part is {got} bytes, the header says {n}")
        if header.sender != rank:
            raise ProtocolError(
                f"the connection of rank {rank} sent a frame claiming sender {header.sender}"
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

    def _drain_monitor(self) -> int:
        """Log what libzmq did to connections on its own: closed one that broke ZeroMQ's
        framing or sent a part above max_frame_bytes (a DISCONNECTED too), or saw one go."""
        mon = self._monitor
        if mon is None:
            return 0
        handled = 0
        try:
            if not mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # re-arms the edge-triggered FD
                return 0
            while True:
                try:
                    event = mon.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return handled
                handled += 1
                kind = parse_monitor_message(event)["event"] if len(event) == 2 else None
                if kind == zmq.EVENT_DISCONNECTED:
                    log.info(
                        "tcp rank %d: a connection to its data port closed (a peer closing or "
                        "gone, or a part above max_frame_bytes %d); ZeroMQ peers reconnect "
                        "under the same binding",
                        self.rank, self.options.max_frame_bytes,
                    )  # fmt: skip
                elif kind is not None:
                    self._refusals.record("whose bytes broke ZeroMQ's handshake (libzmq closed it)")
        except zmq.ZMQError:
            if self._closed:
                return handled
            raise

    # -- teardown ------------------------------------------------------------------------------

    def _close_backend(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        for sock in self._dealers.values():
            sock.close(linger=0)
        self._dealers.clear()
        router = getattr(self, "_router", None)
        if router is not None:
            if self._monitor is not None:
                try:
                    router.disable_monitor()
                except zmq.ZMQError:
                    pass
                self._monitor.close(linger=0)
                self._monitor = None
            router.close(linger=0)
        self._ctx.term()
        if self._rdv is not None:
            self._rdv.close()
            self._rdv = None
