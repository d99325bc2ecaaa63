"""The wire codec transports call: `encode_prefix` and `decode` with the format's checks fused
into fast paths for the hot frames, and the split form of a frame.

Fast paths: frames without payload (heartbeats, acks, shutdowns, errors) and activation frames
(a tensor, no text) are packed and unpacked in one step, with the checks of `protocol` made on
exact ints only. They must give exactly the bytes and Messages of `protocol.encode_prefix_checked`
and `protocol.decode_checked` (tests/transport/test_fast_paths.py checks that), and anything they
do not take, valid or not, goes to those functions, which name what is wrong.

Split form: transports that move the tensor bytes separately (shared-memory rings, NIXL writes,
gloo tensors, ZeroMQ multipart frames) send `encode_parts`: the small *prefix* (header, text
and any SYNC payload) and the tensor bytes as a view; the receiver reads the prefix with
`protocol.decode_header` (which refuses frames above the receiver's `max_frame_bytes`),
allocates `header.tensor_nbytes` bytes, fills them, and calls
`protocol.decode_parts`. Concatenating the two parts gives exactly `encode(msg)`.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from afdserve.transport.buffers import HUGE_ALLOC_BYTES
from afdserve.transport.message import Message, MsgType
from afdserve.transport.protocol import (
    FLAG_TENSOR,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_DIM,
    MAX_DIMS,
    MAX_PAYLOAD_BYTES,
    MAX_TEXT_BYTES,
    VERSION,
    decode_checked,
    encode_prefix_checked,
    extent_bytes,
)
from afdserve.transport.tensor_bytes import EMPTY, from_host_bytes, tensor_payload
from afdserve.transport.wire_types import (
    DTYPES,
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    INT64_MIN,
    ITEMSIZE,
    UINT32_MAX,
    dtype_code,
)

if TYPE_CHECKING:
    Buffer = bytes | bytearray | memoryview

_PLAIN_HEADER = struct.Struct("<4sBBBBIIqiiIIQ64s")
"""HEADER with the shape as one 64-byte field: a frame without payload (HEARTBEAT, SYNC_ACK,
SHUTDOWN, ERROR) has all of it zero, which one bytes comparison checks."""
_ZERO_SHAPE = bytes(8 * MAX_DIMS)
_PLAIN_TYPES = {
    int(t): t for t in (MsgType.SYNC_ACK, MsgType.HEARTBEAT, MsgType.SHUTDOWN, MsgType.ERROR)
}
"""The types a frame may carry without any payload (the others need a tensor or a SyncInfo)."""
_ACTIVATION_TYPES = {
    int(t): t for t in (MsgType.ACTIVATION_TRANSFER, MsgType.ACTIVATION_RESULT, MsgType.ROUTING)
}
"""The hot tensor frames, which `encode_prefix` packs on a fast path."""
_DIMS = struct.Struct(f"<{MAX_DIMS}Q")
_NO_DIMS = tuple((0,) * (MAX_DIMS - n) for n in range(MAX_DIMS + 1))  # shape padding by ndim


# ---------------------------------------------------------------------------------------------
# Encoding


def encode(msg: Message, *, sender: int | None = None) -> bytes:
    """The whole frame as one bytes object (copies the tensor; sockets use `encode_parts`)."""
    prefix, payload = encode_parts(msg, sender=sender)
    return prefix + bytes(payload) if len(payload) else prefix


def encode_parts(msg: Message, *, sender: int | None = None) -> tuple[bytes, memoryview]:
    """(prefix, tensor bytes): prefix = header + text + SYNC payload; tensor bytes are a flat
    byte view of the (contiguous, CPU) tensor, so the caller keeps it unmodified until sent.

    `sender` overrides msg.sender: a transport stamps its own rank so receivers can trust it.
    """
    payload = tensor_payload(msg.tensor) if msg.tensor is not None else EMPTY
    return encode_prefix(msg, sender=sender), payload


def encode_prefix(msg: Message, *, sender: int | None = None) -> bytes:
    """Header + text + SYNC payload of `msg` (everything but the tensor bytes): the bytes of
    `encode_prefix_checked`, on a fast path for plain and activation frames."""
    if type(msg) is Message and msg.tensor is not None:
        header = _encode_activation(msg, sender)
        if header is not None:
            return header
    elif type(msg) is Message and msg.sync is None:
        # Fast path for frames without payload (heartbeats, acks, ...): the checks of
        # encode_prefix_checked, on exact ints only; anything unusual (or invalid) takes it.
        mtype = msg.type
        code = _PLAIN_TYPES.get(mtype) if type(mtype) is MsgType else None
        src = msg.sender if sender is None else sender
        step, layer, mb, text = msg.step, msg.layer, msg.microbatch, msg.text
        if (
            code is not None
            and type(step) is int
            and type(layer) is int
            and type(mb) is int
            and type(src) is int
            and INT64_MIN <= step <= INT64_MAX
            and INT32_MIN <= layer <= INT32_MAX
            and INT32_MIN <= mb <= INT32_MAX
            and 0 <= src <= UINT32_MAX
        ):
            if not text:
                return _PLAIN_HEADER.pack(
                    MAGIC, VERSION, code, 0, 0, 0, src, step, layer, mb, 0, 0, 0, _ZERO_SHAPE
                )
            if type(text) is str:
                raw = text.encode("utf-8")
                if len(raw) <= MAX_TEXT_BYTES:
                    return _PLAIN_HEADER.pack(
                        MAGIC, VERSION, code, 0, 0, 0, src, step, layer, mb, len(raw), 0, 0,
                        _ZERO_SHAPE,
                    ) + raw  # fmt: skip
    return encode_prefix_checked(msg, sender)


def _encode_activation(msg: Message, sender: int | None) -> bytes | None:
    """Fast path for ACTIVATION_TRANSFER/RESULT frames (a tensor, no text, no SyncInfo): the
    checked path's checks on exact ints only; None sends anything else to the checked path."""
    mtype = msg.type
    code = _ACTIVATION_TYPES.get(mtype) if type(mtype) is MsgType else None
    src = msg.sender if sender is None else sender
    step, layer, mb, t = msg.step, msg.layer, msg.microbatch, msg.tensor
    if (
        code is None
        or msg.sync is not None
        or msg.text
        or type(step) is not int
        or type(layer) is not int
        or type(mb) is not int
        or type(src) is not int
        or not INT64_MIN <= step <= INT64_MAX
        or not INT32_MIN <= layer <= INT32_MAX
        or not INT32_MIN <= mb <= INT32_MAX
        or not 0 <= src <= UINT32_MAX
    ):
        return None
    try:
        shape, ndim = t.shape, t.dim()  # type: ignore[union-attr]
        if ndim > MAX_DIMS:
            return None
        dcode = dtype_code(t.dtype)  # type: ignore[union-attr]  # ProtocolError if unknown
        nbytes = t.numel() * t.element_size()  # type: ignore[union-attr]
    except AttributeError:  # not a tensor: the checked path says so
        return None
    if nbytes > MAX_PAYLOAD_BYTES or (
        not nbytes and extent_bytes(shape, t.element_size()) > MAX_PAYLOAD_BYTES  # type: ignore[union-attr]
    ):
        return None
    return HEADER.pack(
        MAGIC, VERSION, code, dcode, ndim, FLAG_TENSOR, src, step, layer, mb, 0, 0, nbytes,
        *shape, *_NO_DIMS[ndim],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Decoding


def decode(buf: Buffer, *, copy: bool = True) -> Message:
    """Decode one whole frame; `buf` must hold exactly one frame.

    The tensor is a fresh CPU tensor that owns its memory, unless `copy=False` and `buf` is
    writable: then it is a view of `buf`, valid while `buf` lives and is not reused.
    """
    n = len(buf)
    if n >= HEADER_SIZE:
        # Fast path for frames without payload: the same checks as decode_header + decode_parts,
        # fused; whatever does not pass them all takes the full path, which names what is wrong.
        (magic, version, type_, dtype, ndim, flags, sender, step, layer, microbatch, text_len,
         reserved, payload_len, shape) = _PLAIN_HEADER.unpack_from(buf, 0)  # fmt: skip
        if (
            flags == 0
            and n == HEADER_SIZE + text_len
            and magic == MAGIC
            and version == VERSION
            and dtype == 0
            and ndim == 0
            and reserved == 0
            and payload_len == 0
            and text_len <= MAX_TEXT_BYTES
            and shape == _ZERO_SHAPE
        ):
            mtype = _PLAIN_TYPES.get(type_)
            if mtype is not None:
                if not text_len:
                    return Message(mtype, step, layer, microbatch, sender)
                try:
                    text = str(memoryview(buf)[HEADER_SIZE:n], "utf-8")
                except UnicodeDecodeError:
                    pass  # the full path reports it
                else:
                    return Message(mtype, step, layer, microbatch, sender, None, None, text)
        elif flags == FLAG_TENSOR and copy:
            msg = _decode_activation(buf, type_, dtype, ndim, sender, step, layer, microbatch,
                                     text_len, reserved, payload_len, shape, magic, version)  # fmt: skip
            if msg is not None:
                return msg
    return decode_checked(buf, copy)


def _decode_activation(
    buf: Buffer, type_: int, dtype: int, ndim: int, sender: int, step: int, layer: int,
    microbatch: int, text_len: int, reserved: int, payload_len: int, shape: bytes, magic: bytes,
    version: int,
) -> Message | None:  # fmt: skip
    """decode's fast path for a whole ACTIVATION_TRANSFER/RESULT frame (no text, a non-empty
    tensor below HUGE_ALLOC_BYTES): decode_header's checks, fused, and one copy of the tensor
    bytes. None sends the frame to the checked path, which names what is wrong with it. (The
    extent check of empty tensors never applies: a non-empty tensor's extent is its size.)"""
    mtype = _ACTIVATION_TYPES.get(type_)
    code = DTYPES.get(dtype)
    if (
        mtype is None
        or code is None
        or text_len != 0
        or reserved != 0
        or magic != MAGIC
        or version != VERSION
        or ndim > MAX_DIMS
        or not 0 < payload_len < HUGE_ALLOC_BYTES
        or len(buf) != HEADER_SIZE + payload_len
    ):
        return None
    dims = _DIMS.unpack(shape)
    if any(dims[ndim:]):
        return None
    numel = 1
    for d in dims[:ndim]:
        if d > MAX_DIM:
            return None
        numel *= d
    if numel * ITEMSIZE[code] != payload_len:
        return None
    import numpy as np

    raw = np.frombuffer(buf, dtype=np.uint8, count=payload_len, offset=HEADER_SIZE).copy()
    return Message(mtype, step, layer, microbatch, sender, from_host_bytes(raw, code, dims[:ndim]))
