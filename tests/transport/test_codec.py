"""The wire codec: exact round trips, and no input can make decode do anything but return a
Message or raise ProtocolError."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afdserve.errors import ProtocolError
from afdserve.transport.codec import decode, encode, encode_parts
from afdserve.transport.message import Message, MsgType, SyncInfo
from afdserve.transport.protocol import (
    HEADER,
    HEADER_SIZE,
    MAX_DIMS,
    MAX_TEXT_BYTES,
    decode_header,
    decode_parts,
)
from afdserve.transport.tensor_bytes import view_tensor
from tests.transport.mutations import mutate_frame

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]  # fmt: skip
ACTIVATIONS = [MsgType.ACTIVATION_TRANSFER, MsgType.ACTIVATION_RESULT]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 6), min_size=0, max_size=MAX_DIMS).map(tuple)
int32s = st.integers(-(2**31), 2**31 - 1)
texts = st.text(max_size=50)


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1000
    return x > 0 if dtype == torch.bool else x.to(dtype)


def same(a: Message, b: Message) -> bool:
    if (a.type, a.step, a.layer, a.microbatch, a.sender, a.sync, a.text) != (
        b.type, b.step, b.layer, b.microbatch, b.sender, b.sync, b.text,
    ):  # fmt: skip
        return False
    if (a.tensor is None) != (b.tensor is None):
        return False
    if a.tensor is None:
        return True
    return (
        a.tensor.dtype == b.tensor.dtype
        and a.tensor.shape == b.tensor.shape
        and torch.equal(a.tensor, b.tensor)
    )


@st.composite
def tensor_messages(draw):
    dtype = draw(st.sampled_from(DTYPES))
    t = make_tensor(draw(shapes), dtype, draw(st.integers(0, 2**16)))
    return Message(
        draw(st.sampled_from(ACTIVATIONS + [MsgType.HEARTBEAT, MsgType.ERROR])),
        draw(st.integers(-(2**63), 2**63 - 1)),
        draw(int32s),
        draw(int32s),
        draw(st.integers(0, 2**32 - 1)),
        tensor=t,
        text=draw(texts),
    )


syncs = st.integers(0, 8).flatmap(
    lambda m: st.builds(
        SyncInfo,
        st.lists(st.integers(0, 2**32 - 1), min_size=m, max_size=m).map(tuple),
        st.one_of(
            st.just(()),
            st.lists(
                st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5).map(tuple),
                min_size=m,
                max_size=m,
            ).map(tuple),
        ),
    )
)


@st.composite
def control_messages(draw):
    kind = draw(
        st.sampled_from(
            [
                MsgType.SYNC_REQUEST,
                MsgType.SYNC_ACK,
                MsgType.HEARTBEAT,
                MsgType.SHUTDOWN,
                MsgType.ERROR,
            ]
        )
    )
    sync = (
        draw(syncs)
        if kind is MsgType.SYNC_REQUEST or (kind is MsgType.SYNC_ACK and draw(st.booleans()))
        else None
    )
    return Message(
        kind,
        draw(st.integers(0, 2**40)),
        sender=draw(st.integers(0, 64)),
        sync=sync,
        text=draw(texts),
    )


messages = st.one_of(tensor_messages(), control_messages())


@SETTINGS
@given(messages)
def test_round_trip_every_message(msg):
    frame = encode(msg)
    assert same(decode(frame), msg)
    prefix, payload = encode_parts(msg)
    assert prefix + bytes(payload) == frame
    header = decode_header(prefix)
    assert header.prefix_len == len(prefix) and header.tensor_nbytes == len(payload)
    raw = np.frombuffer(bytes(payload), dtype=np.uint8).copy() if len(payload) else None
    assert same(decode_parts(header, prefix, raw), msg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(), (0,), (0, 7), (3, 0, 2), (1,), (5, 3), (2, 3, 4, 5, 1, 1, 2, 2)]
)
def test_round_trip_every_dtype_and_shape(dtype, shape):
    x = make_tensor(shape, dtype, 7)
    back = decode(encode(Message(MsgType.ACTIVATION_TRANSFER, 3, 1, 0, 2, tensor=x))).tensor
    assert back.dtype == dtype and back.shape == x.shape and torch.equal(back, x)
    assert not back.is_set_to(x)  # decoded tensors own their memory


def test_bf16_bits_survive_exactly():
    bits = torch.tensor(
        [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x3F80, 0xFFFF], dtype=torch.int32
    ).to(torch.int16)
    x = bits.view(torch.bfloat16)  # zeros, infinities, a NaN payload, a denormal, 1.0
    back = decode(encode(Message(MsgType.ACTIVATION_RESULT, 0, tensor=x))).tensor
    assert torch.equal(back.view(torch.int16), bits)


def test_non_contiguous_grad_and_views_encode_their_values():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for x in (base.t(), base[:, ::2], base[1:3], torch.ones(3, requires_grad=True) * 2):
        back = decode(encode(Message(MsgType.ACTIVATION_TRANSFER, 0, tensor=x))).tensor
        assert torch.equal(back, x.detach())


def test_decode_copy_false_views_a_writable_buffer():
    x = torch.arange(10, dtype=torch.float32)
    buf = bytearray(encode(Message(MsgType.ACTIVATION_TRANSFER, 0, tensor=x)))
    t = decode(buf, copy=False).tensor
    assert torch.equal(t, x)
    buf[-4:] = struct.pack("<f", 99.0)
    assert t[-1].item() == 99.0  # a view, as documented


# -- malformed input ---------------------------------------------------------------------------


def decodes_or_rejects(data: bytes) -> None:
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert isinstance(msg, Message)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_decode(data):
    decodes_or_rejects(data)
    decodes_or_rejects(b"AFDW\x01" + data)  # past the magic and version checks


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_mutated_frames_never_crash_decode(msg, data):
    frame = bytearray(encode(msg))
    mutate_frame(frame, data, ["flip", "set", "truncate", "extend", "splice"])
    decodes_or_rejects(bytes(frame))


def _frame(**fields) -> bytes:
    values = dict(magic=b"AFDW", version=1, type=1, dtype=1, ndim=1, flags=1, sender=0, step=0, layer=0,
                  microbatch=0, text_len=0, reserved=0, payload_len=8, shape=(2,) + (0,) * 7)  # fmt: skip
    values.update(fields)
    shape = values.pop("shape")
    body = values.pop("body") if "body" in values else b"\0" * values["payload_len"]
    return HEADER.pack(*values.values(), *shape) + body


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(magic=b"XXXX"), "bad magic"),
        (dict(version=2), "unsupported protocol version 2"),
        (dict(type=99), "unknown message type 99"),
        (dict(dtype=77), "unknown dtype code 77"),
        (dict(ndim=9), "ndim 9 exceeds 8"),
        (dict(flags=8), "unknown flag bits"),
        (dict(flags=3), "both a tensor and a SYNC payload"),
        (dict(reserved=1), "reserved header field"),
        (dict(payload_len=12, body=b"\0" * 12), r"does not match shape \(2,\) x float32"),
        (dict(shape=(2, 5) + (0,) * 6), "unused shape entries"),
        (dict(body=b"\0" * 4), "header says"),
        (dict(body=b"\0" * 9), "header says"),
        (dict(text_len=MAX_TEXT_BYTES + 1), "text length"),
        (dict(text_len=2, body=b"\xff\xfe" + b"\0" * 8), "not valid UTF-8"),
        (
            dict(flags=0, dtype=0, ndim=0, shape=(0,) * 8, payload_len=0, body=b""),
            "carries no tensor",
        ),
        (
            dict(type=5, flags=0, dtype=1, ndim=0, shape=(0,) * 8, payload_len=0, body=b""),
            "without a tensor has dtype",
        ),
        (
            dict(type=3, flags=0, dtype=0, ndim=0, shape=(0,) * 8, payload_len=0, body=b""),
            "SYNC_REQUEST frame carries no SYNC",
        ),
        (
            dict(type=5, flags=2, dtype=0, ndim=0, shape=(0,) * 8, payload_len=8, body=b"\0" * 8),
            "must not carry a SYNC",
        ),
        (dict(shape=(2**41,) + (0,) * 7), "dimension above"),
        (dict(payload_len=2**41, body=b""), "payload length"),
    ],
)
def test_each_malformed_field_is_named(fields, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_frame(**fields))


def _sync_frame(payload: bytes) -> bytes:
    return _frame(
        type=3, flags=2, dtype=0, ndim=0, shape=(0,) * 8, payload_len=len(payload), body=payload
    )


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\0" * 4, "shorter than"),
        (struct.pack("<II", 2, 0) + struct.pack("<I", 5), "too short for 2 microbatches"),
        (struct.pack("<II", 1, 2) + struct.pack("<I", 5), "must be 0 or 1"),
        (
            struct.pack("<II", 1, 1) + struct.pack("<II", 5, 3) + struct.pack("<q", 1),
            "request id counts need",
        ),
        (struct.pack("<II", 1, 0) + struct.pack("<I", 5) + b"\0", "expected 12"),
        (struct.pack("<II", 2**17, 0), "claims 131072 microbatches"),
    ],
)
def test_malformed_sync_payloads_are_rejected(payload, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_sync_frame(payload))


def test_frame_shorter_than_header():
    with pytest.raises(ProtocolError, match=f"shorter than the {HEADER_SIZE}-byte header"):
        decode(b"AFDW")


# -- encode refuses what the wire cannot carry -------------------------------------------------


@pytest.mark.parametrize(
    "msg, match",
    [
        (Message(MsgType.ACTIVATION_TRANSFER, 0), "must carry a tensor"),
        (Message(MsgType.SYNC_REQUEST, 0), "must carry a SyncInfo"),
        (Message(MsgType.SYNC_REQUEST, 0, tensor=torch.ones(1)), "not a tensor"),
        (Message(MsgType.HEARTBEAT, 0, sync=SyncInfo((1,))), "only SYNC_REQUEST and SYNC_ACK"),
        (
            Message(MsgType.ACTIVATION_RESULT, 0, tensor=torch.ones(2, dtype=torch.complex64)),
            "dtype torch.complex64",
        ),
        (Message(MsgType.ACTIVATION_RESULT, 0, tensor=torch.ones([1] * 9)), "at most 8"),
        (Message(MsgType.HEARTBEAT, 2**63), "step"),
        (Message(MsgType.HEARTBEAT, 0, layer=2**31), "layer"),
        (Message(MsgType.HEARTBEAT, 0, sender=-1), "sender"),
        (Message(MsgType.HEARTBEAT, True), "step must be an integer"),
        (
            Message(MsgType.SYNC_REQUEST, 0, sync=SyncInfo((1, 2), ((1,),))),
            "1 lists for 2 microbatches",
        ),
        (Message(MsgType.SYNC_REQUEST, 0, sync=SyncInfo((-1,))), "tokens_per_microbatch"),
    ],
)
def test_encode_rejects_what_the_wire_cannot_carry(msg, match):
    with pytest.raises(ProtocolError, match=match):
        encode(msg)


def test_long_text_is_cut_on_a_character_boundary():
    msg = decode(encode(Message(MsgType.ERROR, 0, text="é" * 3000)))
    assert msg.text == "é" * (MAX_TEXT_BYTES // 2)


def test_sender_override_and_view_checks():
    msg = Message(MsgType.ACTIVATION_TRANSFER, 1, tensor=torch.ones(4))
    assert decode(encode(msg, sender=5)).sender == 5
    prefix, _ = encode_parts(msg)
    header = decode_header(prefix)
    with pytest.raises(ProtocolError, match="header says 16"):
        view_tensor(header, np.zeros(15, dtype=np.uint8))
    with pytest.raises(ProtocolError, match="needs its 16 tensor bytes"):
        decode_parts(header, prefix, None)
