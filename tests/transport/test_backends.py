"""Every multi-process backend, with real processes on 127.0.0.1.

Per backend: a 3-rank group (2 attention peers + the test process as FFN) moves tensors of every
dtype and shape both ways (small frames, frames that stream through rings/slots many times over,
0-size), answers keys out of order, times out on a key nobody sends, survives garbage, and shuts
down leaving no process or /dev/shm segment behind; a 2-rank group checks that killing the peer
makes waits fail with TransportTimeout instead of hanging.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
import torch

from afdserve.errors import TransportClosed, TransportTimeout
from afdserve.transport.codec import encode
from afdserve.transport.message import Message, MsgType, SyncInfo

from .conftest import BACKENDS, shm_segments
from .peer_main import key_of

pytestmark = pytest.mark.timeout(180)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool)
SHAPES = ((4, 8), (0, 16), (), (3, 1, 5), (300, 1024), (1, 70_000))  # up to 280 KB (fp32)


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 100
    return x > 0 if dtype == torch.bool else x.to(dtype)


def _exchange(g, tensors: list[torch.Tensor], first_step: int) -> int:
    """Send every tensor to every peer (steps first_step.., in shuffled order), then collect the
    echoes in reverse order: the keyed mailbox must hand each caller exactly its message."""
    tr = g.transport
    steps = list(range(first_step, first_step + len(tensors)))
    order = steps[1::2] + steps[0::2]  # odd positions first: peers receive out of order
    for step in order:
        layer, mb = key_of(step)
        x = tensors[step - first_step]
        for peer in range(g.r):
            tr.send(
                peer,
                Message(
                    MsgType.ACTIVATION_TRANSFER, step, layer, mb, tr.rank, tensor=x, text=f"s{step}"
                ),
            )
    for step in reversed(steps):
        layer, mb = key_of(step)
        x = tensors[step - first_step]
        for peer in reversed(range(g.r)):
            m = tr.recv(peer, MsgType.ACTIVATION_RESULT, step, layer, mb, timeout_s=30)
            assert (m.sender, m.step, m.layer, m.microbatch, m.text) == (
                peer,
                step,
                layer,
                mb,
                f"s{step}",
            )
            assert m.tensor.dtype == x.dtype and m.tensor.shape == x.shape
            assert torch.equal(m.tensor, x), (
                f"{g.backend}: tensor {x.dtype}{tuple(x.shape)} changed in transit"
            )
    return first_step + len(tensors)


def _stop(g, step: int) -> None:
    layer, mb = key_of(step)
    for peer in range(g.r):
        g.transport.send(peer, Message(MsgType.ACTIVATION_TRANSFER, step, layer, mb, g.transport.rank,
                                       tensor=torch.zeros(0), text="stop"))  # fmt: skip


def _sync(g) -> None:
    tr = g.transport
    sync = SyncInfo((3, 0, 7), ((11, 12, 13), (), (1, 2, 3, 4, 5, 6, 7)))
    text = "plan " + "é" * 400  # > 488 bytes of prefix: the torch backend's extra control tensor
    for peer in range(g.r):
        tr.send(peer, Message(MsgType.SYNC_REQUEST, 0, sender=tr.rank, sync=sync, text=text))
    for peer in range(g.r):
        ack = tr.recv(peer, MsgType.SYNC_ACK, 0, timeout_s=30)
        assert ack.sync == sync and ack.text == text and ack.sender == peer


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_moves_every_dtype_and_shape_and_cleans_up(make_group, backend):
    before = shm_segments()
    g = make_group(backend, r=2)
    g.start()
    _sync(g)
    tensors = [
        _tensor(s, dt, seed=i) for i, (dt, s) in enumerate((dt, s) for dt in DTYPES for s in SHAPES)
    ]
    step = _exchange(g, tensors, first_step=1)
    # a non-contiguous tensor travels as its contiguous copy
    step = _exchange(g, [torch.arange(64, dtype=torch.float32).reshape(8, 8).t()], step)
    _stop(g, step)
    results = g.wait_peers()
    for rc, out, err in results:
        assert rc == 0, f"{backend} peer failed ({rc}):\n{out}\n{err}"
        assert f"echoed {step - 1}" in out
    g.transport.close()
    g.transport.close()  # idempotent
    assert shm_segments() <= before, f"{backend} left /dev/shm segments: {shm_segments() - before}"
    assert all(p.poll() is not None for p in g.procs)


def _outsider_garbage(backend: str, tr) -> int:
    """Bytes from a process that is no peer at all, written straight at the endpoint; returns
    how many of them must be counted as dropped."""
    if backend == "shm":
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:  # unbound: no sender address
            s.sendto(b"\x01" + encode(Message(MsgType.HEARTBEAT, 1, sender=0)), tr._addr[tr.rank])
            s.sendto(os.urandom(100), tr._addr[tr.rank])
        return 2
    if backend == "tcp":
        import zmq

        host, port = tr.address.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:  # not even ZMTP
            s.sendall(os.urandom(4096))
        # a ZeroMQ socket of a compatible type that never did the handshake: all it sends is
        # dropped, the frame that claims to be the real peer's too
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 1000)
        dealer.connect(tr.address)
        dealer.send_multipart([b"not a frame", os.urandom(64)])
        dealer.send_multipart([encode(Message(MsgType.HEARTBEAT, 1, sender=77))])  # no peer
        dealer.send_multipart([encode(Message(MsgType.HEARTBEAT, 1, sender=0))])  # spoofed
        dealer.close()
        return 3
    return 0


@pytest.mark.parametrize("backend", ["shm", "tcp", "nixl"])
def test_garbage_is_dropped_and_serving_goes_on(make_group, backend):
    g = make_group(backend, r=1)
    g.start(garbage=True)  # the peer sends malformed frames through its own channel first
    tr = g.transport
    outsider = _outsider_garbage(backend, tr)
    _sync(g)
    step = _exchange(
        g, [_tensor((50, 2000), torch.bfloat16, 1), _tensor((2, 3), torch.float32, 2)], 1
    )
    _stop(g, step)
    ((rc, out, err),) = g.wait_peers()
    assert rc == 0, err
    expected = (
        int(out.split("garbage ")[1].split()[0]) - 1 + outsider
    )  # an empty datagram may vanish
    deadline = time.monotonic() + 10
    while tr.dropped_frames < expected and time.monotonic() < deadline:
        tr.poll(0, MsgType.HEARTBEAT, 1)
        time.sleep(0.01)
    assert tr.dropped_frames >= expected > 0
    assert not tr.poll(0, MsgType.HEARTBEAT, 1)  # forged heartbeats were not delivered
    _close_wakes_a_waiter(tr, backend)


def _close_wakes_a_waiter(tr, backend: str) -> None:
    """A thread blocked in recv gets TransportClosed from close(). (shm learnt from the peer's
    goodbye that it is gone, so its waiter may fail with PeerUnreachable first.)"""
    errors: list[Exception] = []

    def waiter() -> None:
        try:
            tr.recv(0, MsgType.HEARTBEAT, 1, timeout_s=60)
        except Exception as e:  # the test inspects the type
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)
    tr.close()
    t.join(10)
    assert not t.is_alive() and len(errors) == 1, errors
    expected = (TransportClosed, TransportTimeout) if backend == "shm" else TransportClosed
    assert isinstance(errors[0], expected), errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeouts_dead_peer_and_close(make_group, backend):
    """A key nobody sends times out; a killed peer makes waits fail typed (TransportTimeout or
    its subclass PeerUnreachable) instead of hanging; close wakes a blocked waiter."""
    before = shm_segments()
    g = make_group(backend, r=1)
    g.start()
    tr = g.transport
    t0 = time.monotonic()
    with pytest.raises(TransportTimeout, match="HEARTBEAT from rank 0"):
        tr.recv(0, MsgType.HEARTBEAT, 12345, timeout_s=0.3)
    assert time.monotonic() - t0 >= 0.3
    _sync(g)
    _exchange(g, [_tensor((4, 4), torch.float32, 0)], 1)

    g.procs[0].send_signal(signal.SIGKILL)
    g.procs[0].wait(timeout=30)
    t0 = time.monotonic()
    with pytest.raises(TransportTimeout):
        tr.recv(0, MsgType.ACTIVATION_RESULT, 2, *key_of(2), timeout_s=1.0)
    assert time.monotonic() - t0 < 30, "recv from a dead peer overran its 1 s deadline by far"
    t0 = time.monotonic()  # sending to it is queued or fails typed, within send_timeout_s
    for step in (2, 3):
        try:
            tr.send(
                0,
                Message(
                    MsgType.ACTIVATION_TRANSFER,
                    step,
                    *key_of(step),
                    tr.rank,
                    tensor=torch.ones(1000, 100),
                ),
            )
        except TransportTimeout:
            pass
    assert time.monotonic() - t0 < 60

    errors: list[Exception] = []

    def waiter() -> None:
        try:
            tr.recv(0, MsgType.HEARTBEAT, 1, timeout_s=60)
        except Exception as e:  # the test inspects the type
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    tr.close()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 30
    # the waiter either was woken by close, or had already learnt that its peer is dead
    assert len(errors) == 1 and isinstance(errors[0], (TransportClosed, TransportTimeout)), errors
    with pytest.raises(TransportClosed):
        tr.send(0, Message(MsgType.HEARTBEAT, 2))
    with pytest.raises(TransportClosed):
        tr.recv(0, MsgType.HEARTBEAT, 3, timeout_s=1)
    tr.close()  # idempotent
    assert shm_segments() <= before
