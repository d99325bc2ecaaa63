"""A live tcp group (two attention peers in their own processes, the FFN endpoint here, all
with the group's key) keeps exchanging valid frames while a bounded stream of garbage reaches
the FFN's data port: raw bytes that are not ZeroMQ, handshakes with a wrong key, 2,000 damaged
frames of every type and spoofed SYNCs from connections that never finished the handshake, and
frames claiming another sender on the peers' own authenticated connections. Nothing crashes,
every valid frame arrives intact, every bad one is counted as dropped, none is delivered."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest
import torch
import zmq

from afdserve.transport.codec import encode
from afdserve.transport.message import Message, MsgType, SyncInfo
from afdserve.transport.tcp_handshake import ClientHandshake, new_routing_id
from tests.transport.mutations import mutate
from tests.transport.test_frame_fuzz import valid_messages

from .test_backends import _exchange, _stop, _sync, _tensor

pytestmark = pytest.mark.timeout(180)

KEY = b"the-group-key-of-this-test-0123!"
SPOOF_STEP = 2**40 + 17
"""Every forged frame's step: no real exchange uses it."""


def attack(address: str, rng: random.Random) -> int:
    """Throw the garbage at `address`; return how many ZeroMQ messages reached its ROUTER from
    connections that are not bound (each must be dropped)."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    ctx = zmq.Context.instance()
    reached = 0
    templates = [encode(m) for m in valid_messages()]
    for _ in range(20):  # not ZeroMQ: libzmq closes these itself, or first parses some of the
        # bytes as ZMTP 1.0 messages (no greeting), which reach the ROUTER and are dropped too
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(os.urandom(512))
    for _ in range(10):  # the handshake with a wrong key, then frames anyway
        ident = new_routing_id()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.ROUTING_ID, ident)
        sock.connect(address)
        hs = ClientHandshake(0, 2, b"a-wrong-key-0123456789abcdefghij", ident)
        sock.send(hs.hello())
        if sock.poll(5000):
            sock.recv()  # the challenge it cannot check
        sock.send(b"AFDH\x01\x03" + hs._nonce + os.urandom(32))  # an AUTH it cannot compute
        spoofed = Message(MsgType.SYNC_REQUEST, SPOOF_STEP, sender=0, sync=SyncInfo((1, 1, 1)))
        for f in [encode(spoofed)] + [mutate(rng, rng.choice(templates)) for _ in range(20)]:
            sock.send(f)
            reached += 1
        sock.close()
    sock = ctx.socket(zmq.DEALER)  # no handshake at all
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(address)
    for i in range(2000):
        if i % 100 == 0:
            sock.send(encode(Message(MsgType.SYNC_REQUEST, SPOOF_STEP, sender=i % 2,
                                     sync=SyncInfo((1, 1, 1)))))  # fmt: skip
        else:
            frame = mutate(rng, rng.choice(templates))
            sock.send_multipart(
                [frame[:200], frame[200:]] if len(frame) > 200 and i % 3 == 0 else [frame]
            )
        reached += 1
    sock.close()
    return reached


def test_garbage_and_spoofed_frames_while_the_real_peers_exchange(make_group):
    g = make_group("tcp", r=2)
    g.options["auth_key"] = KEY
    g.start(garbage=True)  # the peers also send bad frames on their authenticated connections
    ffn = g.transport
    result: dict[str, int | BaseException] = {}

    def attacker() -> None:
        try:
            result["reached"] = attack(ffn.address, random.Random(17))
        except BaseException as e:  # surfaced below
            result["error"] = e

    t = threading.Thread(target=attacker)
    t.start()
    _sync(g)
    step = 1
    for round_ in range(6):  # valid traffic all along the attack
        tensors = [
            _tensor((64, 256), torch.bfloat16, round_),
            _tensor((3, 5), torch.float32, round_),
        ]
        step = _exchange(g, tensors, step)
    t.join(120)
    assert not t.is_alive() and "error" not in result, result
    _stop(g, step)
    peers = g.wait_peers()
    for rc, out, err in peers:
        assert rc == 0, f"peer failed ({rc}):\n{out}\n{err}"
    from_peers = sum(int(out.split("garbage ")[1].split()[0]) for _, out, _ in peers)
    expected = result["reached"] + from_peers
    deadline = time.monotonic() + 30
    while ffn.dropped_frames < expected and time.monotonic() < deadline:
        ffn.poll(0, MsgType.HEARTBEAT, 1)
        time.sleep(0.02)
    assert ffn.dropped_frames >= expected  # (plus what the raw bytes parsed into)
    assert ffn.refused_connections >= 10  # the wrong keys (and maybe the raw bytes)
    assert ffn._thread.is_alive()  # the pump thread survived it all
    for sender in (0, 1):
        assert not ffn.poll(sender, MsgType.SYNC_REQUEST, SPOOF_STEP)
        assert not ffn.poll(sender, MsgType.HEARTBEAT, 1)  # the peers' spoofed heartbeats
    assert len(ffn.mailbox) == 0  # nothing forged or damaged was delivered
