"""tcp endpoints (in this process, on 127.0.0.1) bind every connection to the rank its
handshake established: a connection that fails the handshake gets nothing through, a frame
claiming another sender on an authenticated connection is dropped, a ZeroMQ reconnect keeps
its binding, and a part above max_frame_bytes closes its connection before it is allocated."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch
import zmq

from afdserve.errors import ProtocolError, TransportTimeout
from afdserve.transport.codec import encode
from afdserve.transport.message import Message, MsgType, SyncInfo
from afdserve.transport.options import afd_peers, free_port
from afdserve.transport.tcp import TcpOptions, TcpTransport
from afdserve.transport.tcp_handshake import ClientHandshake, new_routing_id

pytestmark = pytest.mark.timeout(120)

KEY = b"group-secret-0123456789abcdef!!!"


def build(
    world: int, r: int, keys: list[bytes], connect_timeout_s: float = 20, **opts
) -> list[TcpTransport | BaseException]:
    """Every rank's endpoint, built concurrently (each constructor waits for its peers); a
    rank whose constructor failed gives its exception instead."""
    rdv = f"127.0.0.1:{free_port()}"
    out: list = [None] * world

    def make(rank: int) -> None:
        try:
            out[rank] = TcpTransport(
                rank, world,
                TcpOptions(rendezvous=rdv, peers=afd_peers(rank, r), connect_timeout_s=connect_timeout_s,
                           auth_key=keys[rank], **opts),
            )  # fmt: skip
        except BaseException as e:  # the test inspects it
            out[rank] = e

    threads = [threading.Thread(target=make, args=(k,)) for k in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.fixture
def group(request):
    """Attention ranks 0 and 1, FFN rank 2, all holding KEY (or none: param b"")."""
    key = getattr(request, "param", KEY)
    eps = build(3, 2, [key] * 3)
    for e in eps:
        if isinstance(e, BaseException):
            raise e
    yield eps
    for e in eps:
        e.close()


def outsider(address: str, ident: bytes | None = None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    if ident is not None:
        sock.setsockopt(zmq.ROUTING_ID, ident)
    sock.connect(address)
    return sock


def wait_dropped(tr: TcpTransport, n: int, deadline_s: float = 10.0) -> int:
    deadline = time.monotonic() + deadline_s
    while tr.dropped_frames < n and time.monotonic() < deadline:
        tr.poll(0, MsgType.HEARTBEAT, -1)
        time.sleep(0.01)
    return tr.dropped_frames


def activation(step: int, sender: int) -> Message:
    return Message(MsgType.ACTIVATION_TRANSFER, step, 0, 0, sender, tensor=torch.full((4, 8), step))


@pytest.mark.parametrize("group", [KEY, b""], indirect=True, ids=["key", "no-key"])
def test_a_spoofed_sender_on_an_authenticated_connection_is_dropped(group):
    a0, a1, ffn = group
    spoof = Message(MsgType.SYNC_REQUEST, 99, sender=0, sync=SyncInfo((1, 1, 1)))
    raw = encode(spoof)
    assert len(raw) == 132  # the size of the spoofed SYNC
    a1._dealers[2].send(raw)  # rank 1's own connection, claiming to be rank 0
    a0.send(2, activation(1, 0))
    a1.send(2, activation(1, 1))
    for k in (0, 1):
        assert torch.equal(ffn.recv(k, MsgType.ACTIVATION_TRANSFER, 1, timeout_s=10).tensor,
                           torch.full((4, 8), 1))  # fmt: skip
    assert wait_dropped(ffn, 1) == 1
    assert not ffn.poll(0, MsgType.SYNC_REQUEST, 99)


def test_a_connection_that_fails_the_handshake_gets_nothing_through(group):
    a0, a1, ffn = group
    ident = new_routing_id()
    sock = outsider(ffn.address, ident)
    impostor = ClientHandshake(0, 2, b"not the group's key 0123456789!!", ident)
    sock.send(impostor.hello())
    assert sock.poll(10_000), "no reply to HELLO"
    with pytest.raises(ProtocolError, match="failed to prove"):  # nor can it fake the server
        impostor.on_reply(sock.recv())
    # it answers the challenge anyway, with a MAC it cannot compute: refused
    sock.send(b"AFDH\x01\x03" + impostor._nonce + bytes(32))
    assert sock.poll(10_000)
    assert b"failed to prove the key" in sock.recv()
    assert ffn.refused_connections == 1
    frames = [encode(Message(MsgType.SYNC_REQUEST, 7, sender=0, sync=SyncInfo((3,)))),
              encode(activation(7, 0))]  # fmt: skip
    for f in frames:
        sock.send(f)
    sock.send_multipart([b"AFDW", b"x" * 100])
    sock.close()
    assert wait_dropped(ffn, 3) == 3
    assert not ffn.poll(0, MsgType.SYNC_REQUEST, 7) and not ffn.poll(
        0, MsgType.ACTIVATION_TRANSFER, 7
    )
    a0.send(2, activation(8, 0))  # the real peer's traffic flows
    assert ffn.recv(0, MsgType.ACTIVATION_TRANSFER, 8, timeout_s=10).sender == 0


def refused(eps: list) -> list[str]:
    """Each endpoint's failure. The first to learn the other's key is wrong gives up, and may
    do so before it answered the other's handshake, which then times out instead."""
    try:
        assert not any(isinstance(e, TcpTransport) for e in eps), eps
        assert all(isinstance(e, (ProtocolError, TransportTimeout)) for e in eps), eps
        assert any(isinstance(e, ProtocolError) for e in eps), eps
        return [str(e) for e in eps if isinstance(e, ProtocolError)]
    finally:
        for e in eps:
            if isinstance(e, TcpTransport):
                e.close()


def test_endpoints_with_different_keys_refuse_to_connect():
    why = refused(build(2, 1, [KEY, b"another-group-key-0123456789abcd"], connect_timeout_s=5))
    assert all("failed to prove the group's key" in w for w in why), why


def test_a_keyed_endpoint_refuses_a_peer_without_a_key():
    why = refused(build(2, 1, [KEY, b""], connect_timeout_s=5))
    assert all("refused the connection" in w or "challenged rank" in w for w in why), why


def test_a_zeromq_reconnect_keeps_the_connection_binding(group):
    a0, _, ffn = group
    sock = a0._dealers[2]
    sock.disconnect(ffn.address)
    sock.connect(ffn.address)  # a new TCP connection, under the same routing id
    deadline = time.monotonic() + 20
    step = 100
    while True:  # frames sent while ZeroMQ reconnects may be lost; once through, they flow
        a0.send(2, activation(step, 0))
        try:
            got = ffn.recv(0, MsgType.ACTIVATION_TRANSFER, step, timeout_s=0.5)
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "no frame got through after the reconnect"
            step += 1
    assert got.sender == 0 and ffn.dropped_frames == 0


def test_a_part_above_max_frame_bytes_closes_its_connection_unallocated():
    eps = build(2, 1, [KEY, KEY], max_frame_bytes=1 << 16)
    try:
        a, ffn = eps
        with pytest.raises(ProtocolError, match="exceeds max_frame_bytes"):
            a.send(1, Message(MsgType.ACTIVATION_TRANSFER, 1, tensor=torch.zeros(1 << 15)))
        host, port = ffn.address.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            # ZMTP 3.0: greeting, READY as a DEALER, then a message part announcing 8 GiB
            s.sendall(b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32))
            ready = b"\x05READY\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
            s.sendall(bytes([0x04, len(ready)]) + ready)
            s.sendall(b"\x02" + struct.pack(">Q", 8 << 30) + b"x" * 1000)
            closed = False
            try:  # the greeting and READY come back, then the endpoint hangs up
                while s.recv(4096):
                    pass
                closed = True
            except ConnectionResetError:
                closed = True
        assert closed  # (a socket.timeout above instead: the connection stayed open)
        a.send(1, activation(2, 0))  # the endpoint serves on
        assert ffn.recv(0, MsgType.ACTIVATION_TRANSFER, 2, timeout_s=10).sender == 0
    finally:
        for e in eps:
            if isinstance(e, TcpTransport):
                e.close()
