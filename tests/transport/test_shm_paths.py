"""The shm endpoint's send/recv paths, with two endpoints in this process: frames without a tensor
travel whole whatever their size, receivers in several threads each get their own messages, and
a wait still ends at its deadline."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from afdserve.errors import TransportTimeout
from afdserve.transport.protocol import Message, MsgType, SyncInfo
from afdserve.transport.shm import ShmOptions, ShmTransport

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair(request):
    session = f"t{os.getpid()}-{request.node.name[:40]}".replace("[", "_").replace("]", "_")
    opts = ShmOptions(session=session, inline_bytes=4096, ring_bytes=64 << 10, connect_timeout_s=30)
    eps: list[ShmTransport | None] = [None, None]
    errors: list[BaseException] = []

    def make(rank: int) -> None:
        try:
            eps[rank] = ShmTransport(rank, 2, opts)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    yield eps
    for ep in eps:
        ep.close()


def test_sync_frame_larger_than_inline_bytes_arrives(pair):
    a, b = pair
    ids = tuple(tuple(range(i * 400, i * 400 + 400)) for i in range(4))  # ~13 KB of request ids
    sync = SyncInfo((400, 400, 400, 400), ids)
    a.send(1, Message(MsgType.SYNC_REQUEST, 3, sender=0, sync=sync))
    got = b.recv(0, MsgType.SYNC_REQUEST, 3, timeout_s=10)
    assert got.sync == sync and got.sender == 0
    assert b.dropped_frames == 0


def test_receivers_in_several_threads_each_get_their_messages(pair):
    a, b = pair
    n = 200
    results: dict[int, list[int]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def receive(layer: int) -> None:
        try:
            for step in range(n):
                m = b.recv(0, MsgType.HEARTBEAT, step, layer, timeout_s=20)
                results[layer].append(m.step)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=receive, args=(layer,)) for layer in (0, 1)]
    for t in threads:
        t.start()
    x = torch.arange(3000, dtype=torch.float32)  # streams through the ring (> inline_bytes)
    for step in range(n):
        for layer in (1, 0):
            a.send(1, Message(MsgType.HEARTBEAT, step, layer, sender=0, text=f"{step}"))
        if step % 50 == 0:
            a.send(1, Message(MsgType.ACTIVATION_TRANSFER, step, sender=0, tensor=x))
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == {0: list(range(n)), 1: list(range(n))}
    for step in range(0, n, 50):
        got = b.recv(0, MsgType.ACTIVATION_TRANSFER, step, timeout_s=10)
        assert torch.equal(got.tensor, x)
    assert b.dropped_frames == 0


def test_recv_of_a_message_already_queued_and_timeout(pair):
    a, b = pair
    a.send(1, Message(MsgType.HEARTBEAT, 1, sender=0))
    a.send(1, Message(MsgType.HEARTBEAT, 2, sender=0))
    assert b.poll(0, MsgType.HEARTBEAT, 2)
    assert b.recv(0, MsgType.HEARTBEAT, 2, timeout_s=5).step == 2
    assert b.recv(0, MsgType.HEARTBEAT, 1, timeout_s=5).step == 1
    with pytest.raises(TransportTimeout, match="timed out after"):
        b.recv(0, MsgType.HEARTBEAT, 3, timeout_s=0.05)
