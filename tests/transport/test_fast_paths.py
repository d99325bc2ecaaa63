"""The codec's fast paths (frames without payload, activation frames) and the Message constructor
behave exactly like the fully checked paths: same bytes, same Messages, and ProtocolError for
the same inputs."""

from __future__ import annotations

import copy
import dataclasses
import enum
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afdserve.errors import ProtocolError
from afdserve.transport import codec
from afdserve.transport.codec import decode, encode, encode_prefix
from afdserve.transport.message import Message, MsgType, SyncInfo
from afdserve.transport.protocol import HEADER_SIZE, decode_checked, encode_prefix_checked
from tests.transport.mutations import mutate_frame

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Small(enum.IntEnum):  # an int subclass: the fast path leaves it to the checked path
    ONE = 1


def test_message_constructor_keeps_dataclass_semantics():
    m = Message(MsgType.HEARTBEAT, 7, sender=2, text="ok")
    assert (m.type, m.step, m.layer, m.microbatch, m.sender, m.tensor, m.sync, m.text) == (
        MsgType.HEARTBEAT, 7, 0, 0, 2, None, None, "ok",
    )  # fmt: skip
    full = Message(MsgType.SYNC_ACK, 1, 2, 3, 4, None, SyncInfo((1,)), "t")
    assert full == Message(
        type=MsgType.SYNC_ACK,
        step=1,
        layer=2,
        microbatch=3,
        sender=4,
        sync=SyncInfo((1,)),
        text="t",
    )
    assert m == Message(MsgType.HEARTBEAT, 7, sender=2, text="ok")
    assert hash(m) == hash(Message(MsgType.HEARTBEAT, 7, sender=2, text="ok"))
    assert m != dataclasses.replace(m, step=8)
    assert dataclasses.replace(m, step=8).step == 8
    assert pickle.loads(pickle.dumps(m)) == m and copy.copy(m) == m
    assert repr(m).startswith("Message(type=<MsgType.HEARTBEAT: 5>, step=7, layer=0")
    assert [f.name for f in dataclasses.fields(Message)] == [
        "type", "step", "layer", "microbatch", "sender", "tensor", "sync", "text",
    ]  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.step = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        Message(MsgType.HEARTBEAT)  # type: ignore[call-arg]


def _outcome(fn, *args):
    """fn's result, or the class of the error it raised (a non-str text fails in str.encode)."""
    try:
        return fn(*args)
    except (ProtocolError, AttributeError) as e:
        return type(e)


odd_ints = st.one_of(
    st.integers(-(2**64), 2**64),
    st.sampled_from([True, False, 1.0, "1", None, Small.ONE, 2**31, -(2**31) - 1, 2**32, -1]),
)


@SETTINGS
@given(
    st.one_of(
        st.sampled_from(list(MsgType)), st.sampled_from([0, 5, 9, True, 5.0, Small.ONE, (5,)])
    ),
    odd_ints,
    odd_ints,
    odd_ints,
    odd_ints,
    st.one_of(st.none(), odd_ints),
    st.one_of(st.text(max_size=30), st.just("é" * 3000), st.just(None), st.just(b"x")),
)
def test_encode_prefix_fast_path_matches_the_checked_path(
    type_, step, layer, mb, sender, over, text
):
    msg = Message(type_, step, layer, mb, sender, text=text)  # type: ignore[arg-type]
    fast = _outcome(lambda: encode_prefix(msg, sender=over))
    assert fast == _outcome(encode_prefix_checked, msg, over)


plain_messages = st.builds(
    Message,
    st.sampled_from([MsgType.SYNC_ACK, MsgType.HEARTBEAT, MsgType.SHUTDOWN, MsgType.ERROR]),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 2**32 - 1),
    text=st.text(max_size=20),
)


def _decoded(buf: bytes, full: bool):
    try:
        return decode_checked(buf, True) if full else decode(buf)
    except ProtocolError:
        return ProtocolError


@SETTINGS
@given(plain_messages, st.data())
def test_decode_fast_path_accepts_exactly_what_the_checked_path_accepts(msg, data):
    frame = bytearray(encode(msg))
    assert decode(bytes(frame)) == msg
    mutate_frame(frame, data, ["none", "flip", "set", "truncate", "extend"])
    buf = bytes(frame)
    assert _decoded(buf, full=False) == _decoded(buf, full=True)
    assert _decoded(memoryview(buf), full=False) == _decoded(buf, full=True)


def test_decode_fast_path_reports_bad_text_like_the_checked_path():
    frame = bytearray(encode(Message(MsgType.ERROR, 1, text="ab")))
    frame[HEADER_SIZE:] = b"\xff\xfe"
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        decode(bytes(frame))


_tensors = st.builds(
    lambda dtype, shape: torch.zeros(shape, dtype=dtype),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool,
                     torch.complex64]),  # complex64: a dtype the wire lacks
    st.lists(st.integers(0, 3), max_size=9),  # up to 9 dims: one more than the wire carries
)  # fmt: skip


def _mostly(valid, odd):
    """Valid values 4 times in 5: the fast path is taken often, and left for every odd field."""
    return st.one_of(valid, valid, valid, valid, odd)


_field = _mostly(st.integers(-5, 1000), odd_ints)


@SETTINGS
@given(
    _mostly(
        st.sampled_from([MsgType.ACTIVATION_TRANSFER, MsgType.ACTIVATION_RESULT]),
        st.one_of(st.sampled_from(list(MsgType)), st.sampled_from([3, True, Small.ONE])),
    ),
    _field,
    _field,
    _field,
    _mostly(st.integers(0, 1000), odd_ints),
    st.one_of(st.none(), _field),
    _mostly(_tensors, st.sampled_from([np.zeros(3, dtype=np.float32), b"abc"])),
    _mostly(st.just(""), st.text(max_size=5)),
    _mostly(st.none(), st.just(SyncInfo((1,)))),
)
def test_encode_prefix_activation_fast_path_matches_the_checked_path(
    type_, step, layer, mb, sender, over, tensor, text, sync
):
    msg = Message(type_, step, layer, mb, sender, tensor, sync, text)  # type: ignore[arg-type]
    fast = _outcome(lambda: encode_prefix(msg, sender=over))
    assert fast == _outcome(encode_prefix_checked, msg, over)


def test_activation_fast_path_is_taken_and_round_trips():
    x = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    msg = Message(MsgType.ACTIVATION_RESULT, 9, 2, 1, 3, x)
    assert codec._encode_activation(msg, None) == encode_prefix_checked(msg, None)
    got = decode(encode(msg))
    assert (got.type, got.step, got.layer, got.microbatch, got.sender) == (
        MsgType.ACTIVATION_RESULT, 9, 2, 1, 3,
    )  # fmt: skip
    assert torch.equal(got.tensor, x)


activation_messages = st.builds(
    Message,
    st.sampled_from([MsgType.ACTIVATION_TRANSFER, MsgType.ACTIVATION_RESULT]),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 2**32 - 1),
    st.builds(
        lambda dtype, shape: (torch.arange(int(np.prod(shape))) % 7).reshape(shape).to(dtype),
        st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]),
        st.lists(st.integers(0, 4), max_size=4),
    ),
    text=_mostly(st.just(""), st.text(max_size=5)),
)


def _comparable(outcome):
    """A decode outcome with its tensor as (dtype, shape, bytes): Messages holding tensors do
    not compare with ==."""
    if not isinstance(outcome, Message):
        return outcome
    t = outcome.tensor
    view = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return (
        outcome.type, outcome.step, outcome.layer, outcome.microbatch, outcome.sender,
        outcome.sync, outcome.text, t.dtype, tuple(t.shape), view.numpy().tobytes(),
    )  # fmt: skip


@SETTINGS
@given(activation_messages, st.data())
def test_decode_activation_fast_path_accepts_exactly_what_the_checked_path_accepts(msg, data):
    frame = bytearray(encode(msg))
    assert _comparable(decode(bytes(frame))) == _comparable(msg)
    mutate_frame(frame, data, ["none", "flip", "set", "truncate", "extend"])
    buf = bytes(frame)
    assert _comparable(_decoded(buf, full=False)) == _comparable(_decoded(buf, full=True))
    assert _comparable(_decoded(memoryview(buf), full=False)) == _comparable(
        _decoded(buf, full=True)
    )


def _checked_path_unreachable(*_args):
    raise AssertionError("the fast path left this frame to the checked path")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool],
)  # fmt: skip
@pytest.mark.parametrize("shape", [(1,), (3, 4), (2, 1, 5), (1, 2, 1, 2, 1, 2, 1, 3)])
def test_activation_fast_paths_alone_give_the_spec_frames(monkeypatch, dtype, shape):
    x = (torch.arange(int(np.prod(shape))) % 7).reshape(shape).to(dtype)
    msg = Message(MsgType.ACTIVATION_RESULT, -(2**63), 2**31 - 1, -(2**31), 2**32 - 1, x)
    spec_prefix = encode_prefix_checked(msg, None)
    spec_frame = spec_prefix + x.contiguous().view(torch.uint8).numpy().tobytes()
    spec_msg = _comparable(decode_checked(spec_frame, True))
    monkeypatch.setattr(codec, "encode_prefix_checked", _checked_path_unreachable)
    monkeypatch.setattr(codec, "decode_checked", _checked_path_unreachable)
    assert encode_prefix(msg) == spec_prefix
    assert encode(msg) == spec_frame
    assert _comparable(decode(spec_frame)) == spec_msg == _comparable(msg)


@pytest.mark.parametrize(
    "type_", [MsgType.SYNC_ACK, MsgType.HEARTBEAT, MsgType.SHUTDOWN, MsgType.ERROR]
)
@pytest.mark.parametrize("text", ["", "ok", "é" * 2048])
def test_plain_fast_paths_alone_give_the_spec_frames(monkeypatch, type_, text):
    msg = Message(type_, 2**63 - 1, -1, 7, 3, text=text)
    spec_frame = encode_prefix_checked(msg, 5)
    spec_msg = decode_checked(spec_frame, True)
    monkeypatch.setattr(codec, "encode_prefix_checked", _checked_path_unreachable)
    monkeypatch.setattr(codec, "decode_checked", _checked_path_unreachable)
    assert encode_prefix(msg, sender=5) == encode(msg, sender=5) == spec_frame
    assert decode(spec_frame) == spec_msg == dataclasses.replace(msg, sender=5)
