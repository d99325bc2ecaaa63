"""The shm endpoint's send/recv paths, with two endpoints in this process: frames without a tensor
travel whole whatever their size, receivers in several threads each get their own messages, and
a wait still ends at its deadline."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from afdserve.errors import TransportTimeout
from afdserve.transport.message import Message, MsgType, SyncInfo
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


# -- tensors received in place (the fixture's ring: 64 KiB, so frames up to 8 KiB are PLACED) ---


def _frame(step: int, n: int = 2048) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) + 10_000 * step  # [n], 8 KiB at n=2048


def _ring_range(ep: ShmTransport, peer: int) -> tuple[int, int]:
    ring = ep.inbound(peer)
    base = ring.buf.ctypes.data
    return base, base + ring.size


def test_a_placed_tensor_is_received_in_place_writable_and_freed_when_dropped(pair):
    a, b = pair
    a.send(1, Message(MsgType.ACTIVATION_TRANSFER, 1, sender=0, tensor=_frame(1)))
    got = b.recv(0, MsgType.ACTIVATION_TRANSFER, 1, timeout_s=10).tensor
    lo, hi = _ring_range(b, 0)
    assert lo <= got.data_ptr() < hi  # no receive copy: the tensor is the ring
    assert torch.equal(got, _frame(1))
    view = got[100:200]
    got.mul_(2)  # the caller's to modify (the receiver maps the ring read-write)
    del got
    assert b.inbound(0).held_bytes == 8192  # a view of it is alive: still held
    assert torch.equal(view, _frame(1)[100:200] * 2)
    del view
    assert b.inbound(0).held_bytes == 0 and not b.inbound(0).inuse
    # the sender gets the stretch back (lazily; a sender short of space asks for it)
    for step in range(2, 40):
        a.send(1, Message(MsgType.ACTIVATION_TRANSFER, step, sender=0, tensor=_frame(step)))
        assert torch.equal(b.recv(0, MsgType.ACTIVATION_TRANSFER, step, timeout_s=10).tensor,
                           _frame(step))  # fmt: skip
    # everything but the FREEs still lazily due (< lazy_bytes) comes back (the sender's pump
    # thread takes the FREE datagrams in)
    deadline = time.monotonic() + 10
    while a.outbound(1).busy_bytes >= b.inbound(0).lazy_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.outbound(1).busy_bytes < b.inbound(0).lazy_bytes
    assert b.dropped_frames == 0


def test_a_held_tensor_is_never_overwritten_while_traffic_goes_on(pair):
    a, b = pair
    a.send(1, Message(MsgType.ACTIVATION_TRANSFER, 0, sender=0, tensor=_frame(0)))
    kept = b.recv(0, MsgType.ACTIVATION_TRANSFER, 0, timeout_s=10).tensor
    kept_too = []
    for step in range(1, 200):  # 200 x 8 KiB through a 64 KiB ring
        a.send(1, Message(MsgType.ACTIVATION_TRANSFER, step, sender=0, tensor=_frame(step)))
        got = b.recv(0, MsgType.ACTIVATION_TRANSFER, step, timeout_s=10).tensor
        assert torch.equal(got, _frame(step))
        if step % 25 == 0:
            kept_too.append((step, got))  # holds more of the ring, scattered
    assert torch.equal(kept, _frame(0))
    for step, t in kept_too:
        assert torch.equal(t, _frame(step))
    assert b.inbound(0).held_bytes <= b.inbound(0).size // 2  # beyond that, frames were copied out
    assert b.dropped_frames == 0 and a.dropped_frames == 0


def test_frames_nobody_takes_do_not_stall_the_sender(pair):
    a, b = pair
    n = 100  # 800 KiB of frames nobody receives until all are sent: 12x the ring
    for step in range(n):
        a.send(1, Message(MsgType.ACTIVATION_TRANSFER, step, sender=0, tensor=_frame(step)))
    for step in range(n):
        got = b.recv(0, MsgType.ACTIVATION_TRANSFER, step, timeout_s=10)
        assert torch.equal(got.tensor, _frame(step))
    assert b.dropped_frames == 0


def test_a_frame_streams_through_pieces_when_the_ring_is_fragmented(pair, monkeypatch):
    a, b = pair
    streamed = []
    send_streamed = a._send_streamed
    monkeypatch.setattr(
        a, "_send_streamed", lambda *args: streamed.append(1) or send_streamed(*args)
    )
    ring = a.outbound(1)
    # stretches the peer still holds, every other 4 KiB of the ring: 32 KiB free, in pieces
    pieces = {off: 4096 for off in range(0, ring.size, 8192)}
    ring.busy.update(pieces)
    ring.busy_bytes += sum(pieces.values())
    x = _frame(1)  # 8 KiB: no free stretch that long
    a.send(1, Message(MsgType.ACTIVATION_TRANSFER, 1, sender=0, tensor=x))
    assert torch.equal(b.recv(0, MsgType.ACTIVATION_TRANSFER, 1, timeout_s=10).tensor, x)
    assert streamed
    for off, n in pieces.items():
        ring.free(off, n)
    a.send(1, Message(MsgType.ACTIVATION_TRANSFER, 2, sender=0, tensor=_frame(2)))
    assert torch.equal(b.recv(0, MsgType.ACTIVATION_TRANSFER, 2, timeout_s=10).tensor, _frame(2))
    assert len(streamed) == 1  # placed again once the ring has room
    assert b.dropped_frames == 0


def test_ring_envelopes_that_break_the_bookkeeping_are_protocol_errors(pair):
    from afdserve.errors import ProtocolError
    from afdserve.transport.codec import encode_prefix
    from afdserve.transport.shm_envelope import FREE, PLACED, SPAN

    a, b = pair
    a.send(1, Message(MsgType.ACTIVATION_TRANSFER, 1, sender=0, tensor=_frame(1)))
    kept = b.recv(0, MsgType.ACTIVATION_TRANSFER, 1, timeout_s=10).tensor
    (off, n), = b.inbound(0).inuse.items()  # fmt: skip
    prefix = encode_prefix(Message(MsgType.ACTIVATION_TRANSFER, 2, sender=0, tensor=kept))
    placed = bytes([PLACED]) + SPAN.pack(off, n) + prefix
    with pytest.raises(ProtocolError, match="overlaps"):
        b._handle(0, placed)  # over bytes the receiver still holds
    outside = bytes([PLACED]) + SPAN.pack(b.inbound(0).size - 8, n) + prefix
    with pytest.raises(ProtocolError, match="outside"):
        b._handle(0, outside)
    with pytest.raises(ProtocolError, match="not in use"):
        a._handle(1, bytes([FREE]) + SPAN.pack(12345, 8))
    assert torch.equal(kept, _frame(1))


def test_a_stream_announcing_more_than_max_frame_bytes_is_refused_unallocated(pair, monkeypatch):
    import struct

    from afdserve.errors import ProtocolError
    from afdserve.transport.codec import encode_prefix
    from afdserve.transport.shm_envelope import STREAM

    a, b = pair

    def no_allocation(n: int):
        raise AssertionError(f"the receiver allocated {n} bytes for a refused frame")

    monkeypatch.setattr(b._pool, "take", no_allocation)
    prefix = bytearray(encode_prefix(Message(MsgType.ACTIVATION_TRANSFER, 1, tensor=torch.ones(4))))
    struct.pack_into("<QQ", prefix, 40, 2**40, 2**38)  # payload_len, shape: 1 TiB of float32
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        b._handle(0, bytes([STREAM]) + SPAN_OF_NOTHING + bytes(prefix))
    monkeypatch.undo()
    a.send(1, Message(MsgType.HEARTBEAT, 2, sender=0))  # and the endpoint serves on
    assert b.recv(0, MsgType.HEARTBEAT, 2, timeout_s=10).step == 2


SPAN_OF_NOTHING = bytes(16)
"""A STREAM's first chunk at offset 0 of 0 bytes."""


def test_an_unexpected_error_handling_a_datagram_drops_it_and_serving_goes_on(pair, monkeypatch):
    a, b = pair

    def broken(src, body):
        raise RuntimeError("a bug in the receive path")

    monkeypatch.setattr(b, "_on_placed", broken)
    a.send(1, Message(MsgType.ACTIVATION_TRANSFER, 1, sender=0, tensor=_frame(1)))  # PLACED
    a.send(1, Message(MsgType.HEARTBEAT, 2, sender=0))
    assert b.recv(0, MsgType.HEARTBEAT, 2, timeout_s=10).step == 2
    assert b.dropped_frames == 1
    assert not b.poll(0, MsgType.ACTIVATION_TRANSFER, 1)
