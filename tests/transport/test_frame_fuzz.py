"""100,000 damaged frames of every message type, and hypothesis-made headers, at the codec: each
decodes to a Message or raises ProtocolError, nothing else (a RuntimeError from torch, a
ValueError from numpy, a MemoryError), and nothing is allocated beyond the frame's own bytes
(whole frames) or the receiver's max_frame_bytes (the split form, which allocates what
`decode_header` announces)."""

from __future__ import annotations

import random
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afdserve.errors import ProtocolError
from afdserve.transport.codec import decode, encode
from afdserve.transport.message import Message, MsgType, SyncInfo
from afdserve.transport.protocol import HEADER, HEADER_SIZE, decode_header, decode_parts
from tests.transport.mutations import BIG, mutate

SEED = 17
FRAMES = 100_000
SPLIT_MAX = 4096
"""The split-form receiver's max_frame_bytes here: above every valid frame below, below most of
what damaged headers ask for."""


def valid_messages() -> list[Message]:
    g = torch.Generator().manual_seed(SEED)
    return [
        Message(MsgType.ACTIVATION_TRANSFER, 5, 2, 1, 0, tensor=torch.randn(3, 4, generator=g)),
        Message(
            MsgType.ACTIVATION_TRANSFER, 5, 2, 1, 0, tensor=torch.randn(2, 8).bfloat16(), text="h"
        ),  # fmt: skip
        Message(MsgType.ACTIVATION_RESULT, 5, 2, 1, 3, tensor=torch.randn(4, 2).half()),
        Message(MsgType.ACTIVATION_RESULT, 1, 0, 0, 3, tensor=torch.zeros(0, 16)),
        Message(MsgType.ROUTING, 5, 2, 1, 0, tensor=torch.arange(8, dtype=torch.int32).view(4, 2)),
        Message(MsgType.ROUTING, 5, 2, 1, 0, tensor=torch.zeros(0, 2, dtype=torch.int32)),
        Message(
            MsgType.SYNC_REQUEST, 9, sender=1, sync=SyncInfo((3, 0, 2), ((1, 2, 3), (), (4, 5)))
        ),
        Message(MsgType.SYNC_REQUEST, 9, sender=1, sync=SyncInfo((7,))),
        Message(MsgType.SYNC_ACK, 9, sender=2),
        Message(MsgType.SYNC_ACK, 9, sender=2, sync=SyncInfo((1, 1), ((7,), (8,)))),
        Message(MsgType.HEARTBEAT, 3, sender=2, text="busy é"),
        Message(MsgType.HEARTBEAT, 3, sender=2, tensor=torch.tensor([True, False])),
        Message(MsgType.SHUTDOWN, 4, text="bye"),
        Message(MsgType.ERROR, 4, text="x" * 300, tensor=torch.arange(3, dtype=torch.int64)),
    ]


def decode_whole(buf: bytes) -> Message | None:
    """decode(buf): the Message, None for a ProtocolError; anything else fails the test."""
    try:
        msg = decode(buf)
    except ProtocolError:
        return None
    assert isinstance(msg, Message) and isinstance(msg.type, MsgType)
    if msg.tensor is not None:
        assert msg.tensor.numel() * msg.tensor.element_size() <= len(buf) - HEADER_SIZE
    return msg


def decode_split(buf: bytes, max_frame_bytes: int) -> Message | None:
    """What a split-form receiver does (shm STREAM, nixl, torch, tcp): header first, then it
    allocates the tensor bytes the header announces, fills them and builds the Message."""
    try:
        header = decode_header(buf, max_frame_bytes)
    except ProtocolError:
        return None
    assert header.frame_len <= max_frame_bytes
    n = header.tensor_nbytes
    raw = np.empty(n, dtype=np.uint8)  # the allocation the header asked for
    got = buf[header.prefix_len : header.prefix_len + n]
    raw[: len(got)] = np.frombuffer(got, dtype=np.uint8)
    try:
        return decode_parts(header, buf[: header.prefix_len], raw if n else None)
    except ProtocolError:
        return None


def test_every_valid_frame_decodes_both_ways():
    for msg in valid_messages():
        frame = encode(msg)
        assert len(frame) <= SPLIT_MAX
        for got in (decode_whole(frame), decode_split(frame, SPLIT_MAX)):
            assert got is not None and (got.type, got.step, got.text) == (
                msg.type,
                msg.step,
                msg.text,
            )


def test_100k_damaged_frames_decode_or_raise_protocol_error():
    rng = random.Random(SEED)
    frames = [encode(m) for m in valid_messages()]
    outcomes = {"message": 0, "rejected": 0}
    for _ in range(FRAMES):
        buf = mutate(rng, rng.choice(frames))
        msg = decode_whole(buf)
        outcomes["message" if msg is not None else "rejected"] += 1
        decode_split(buf, SPLIT_MAX)
    # the damage must mostly be caught, yet not everything (a flipped text bit is still a frame)
    assert outcomes["rejected"] > FRAMES // 2 and outcomes["message"] > 100, outcomes


def test_a_zero_dimension_beside_huge_ones_is_a_protocol_error():
    """The frame the survival issue found: 0 payload bytes, but a shape no library can build
    (torch: "Stride calculation overflowed")."""
    frame = bytearray(
        encode(Message(MsgType.ROUTING, 1, tensor=torch.zeros(0, 2, 3, dtype=torch.int32)))
    )
    struct.pack_into("<QQ", frame, 56, 2**40, 2**40)
    with pytest.raises(ProtocolError, match="spans more than"):
        decode(bytes(frame))
    with pytest.raises(ProtocolError, match="spans more than"):
        decode_header(bytes(frame))
    with pytest.raises(ProtocolError, match="spans more than"):
        encode(Message(MsgType.ROUTING, 1, tensor=torch.empty(0, 2**20, 2**20, dtype=torch.int32)))


def test_a_header_asking_for_more_than_the_maximum_allocates_nothing():
    """1 TiB announced by a 112-byte prefix: decode_header refuses it for any receiver limit
    below, and neither it nor a whole-frame decode allocates anything on its way there."""
    prefix = HEADER.pack(b"AFDW", 1, int(MsgType.ACTIVATION_TRANSFER), 1, 1, 1, 0, 0, 0, 0, 0, 0,
                         2**40, 2**38, *[0] * 7)  # fmt: skip
    tracemalloc.start()
    try:
        for limit in (1 << 16, 1 << 30, 2**40):
            with pytest.raises(ProtocolError, match="max_frame_bytes"):
                decode_header(prefix, limit)
        with pytest.raises(ProtocolError, match="header says"):
            decode(prefix)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated while refusing a 1 TiB header"


_field = st.one_of(st.sampled_from(BIG), st.integers(0, 2**64 - 1))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([b"AFDW", b"AFDW", b"AFDX"]),
    st.integers(0, 2),
    st.integers(0, 10),
    st.integers(0, 12),
    st.integers(0, 9),
    st.integers(0, 4),
    st.integers(0, 2**32 - 1),
    _field.map(lambda v: v % 2**64 - 2**63),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 300),
    st.one_of(st.just(0), _field.map(lambda v: v % 2**32)),
    st.one_of(st.just(0), st.integers(0, 400), _field),
    st.lists(st.one_of(st.integers(0, 8), _field), min_size=8, max_size=8),
    st.binary(max_size=400),
)
def test_hypothesis_headers_decode_or_raise_protocol_error(
    magic, version, type_, dtype, ndim, flags, sender, step, layer, text_len, reserved,
    payload_len, dims, body,
):  # fmt: skip
    buf = HEADER.pack(magic, version, type_, dtype, ndim, flags, sender, step, layer, 0,
                      text_len, reserved, payload_len, *dims) + body  # fmt: skip
    decode_whole(buf)
    decode_split(buf, SPLIT_MAX)
