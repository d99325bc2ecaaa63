"""The AFD wire format, as a readable specification (docs/protocol.md): frame layout, header
fields, their validation, and a plain, fully checked encode and decode.

A frame is a fixed 112-byte little-endian header, then `text_len` bytes of UTF-8 text, then
`payload_len` bytes of payload: a tensor's raw bytes (C order, `tensor_bytes`) or a SYNC
encoding (`sync_payload`). There is no pickling anywhere, so a frame from a buggy or hostile
peer can at worst be rejected: `decode_header` checks every field and raises `ProtocolError`
naming the first bad one. Field value types (integer ranges, dtype codes) are in `wire_types`.

Decoding raises nothing but `ProtocolError`, whatever the bytes, and allocates nothing a header
asks for before every check passed: a receiver of the split form learns from `decode_header`
(given its `max_frame_bytes`) how many bytes to allocate, and only a frame within that limit
gets that far; a whole-frame decode allocates at most a copy of the tensor bytes it was given.

This module is the reference: `codec` holds the fused fast paths transports call
(`encode_prefix`, `decode`), which must produce exactly the bytes and Messages of
`encode_prefix_checked` and `decode_checked` and fall back to them for anything unusual.
Receivers of the split form (prefix and tensor bytes apart, see `codec`) read the prefix with
`decode_header` and build the Message with `decode_parts`.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, NamedTuple

from afdserve.errors import ProtocolError
from afdserve.transport.message import Message, MsgType
from afdserve.transport.sync_payload import decode_sync, encode_sync
from afdserve.transport.tensor_bytes import tensor_from_buffer, view_tensor
from afdserve.transport.wire_types import (
    DTYPE_NAMES,
    DTYPES,
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    INT64_MIN,
    ITEMSIZE,
    UINT32_MAX,
    DType,
    check_int,
    dtype_code,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    Buffer = bytes | bytearray | memoryview

# Wire format constants. Changing any of them is a new protocol VERSION.

MAGIC = b"AFDW"
VERSION = 1
MAX_DIMS = 8
MAX_TEXT_BYTES = 4096
"""Texts (ERROR reasons, HEARTBEAT status) are short; longer ones are cut at encode."""
MAX_PAYLOAD_BYTES = 1 << 40
MAX_DIM = 1 << 40

FLAG_TENSOR = 1
"""The payload is a tensor's raw bytes (dtype code, ndim and shape describe it)."""
FLAG_SYNC = 2
"""The payload is a SyncInfo (see docs/protocol.md, "SYNC payload")."""
_KNOWN_FLAGS = FLAG_TENSOR | FLAG_SYNC

# The fixed header, little-endian (byte offset: field, what decode_header accepts):
#   0: magic      4s  MAGIC
#   4: version    u8  VERSION
#   5: type       u8  a MsgType
#   6: dtype      u8  a wire_types.DType with FLAG_TENSOR, else 0
#   7: ndim       u8  0..MAX_DIMS; 0 without FLAG_TENSOR
#   8: flags      u32 FLAG_TENSOR or FLAG_SYNC (not both) or neither, no other bits
#  12: sender     u32 the sender's rank
#  16: step       i64
#  24: layer      i32
#  28: microbatch i32
#  32: text_len   u32 <= MAX_TEXT_BYTES, UTF-8
#  36: reserved   u32 0
#  40: payload_len u64 <= MAX_PAYLOAD_BYTES; FLAG_TENSOR: prod(shape) x itemsize; no flag: 0
#  48: shape      8 x u64, entries from ndim on 0, each <= MAX_DIM; with FLAG_TENSOR the
#                 extent (the product of the entries, a 0 counted as 1) x itemsize
#                 <= MAX_PAYLOAD_BYTES, so an empty tensor's strides fit in 64 bits too
HEADER = struct.Struct("<4sBBBBIIqiiIIQ8Q")
HEADER_SIZE = HEADER.size  # 112
MAX_FRAME_BYTES = HEADER_SIZE + MAX_TEXT_BYTES + MAX_PAYLOAD_BYTES
"""The longest frame the wire can describe; receivers accept far less (their `max_frame_bytes`)."""
_MSG_TYPES = {int(t): t for t in MsgType}
TENSOR_TYPES = frozenset({MsgType.ACTIVATION_TRANSFER, MsgType.ACTIVATION_RESULT, MsgType.ROUTING})
"""The types whose frames must carry a tensor."""


class FrameHeader(NamedTuple):
    """A validated fixed header. Lengths tell a receiver how many bytes follow and what they are.

    (A NamedTuple rather than a frozen dataclass: it is built once per received frame.)
    """

    type: MsgType
    flags: int
    sender: int
    step: int
    layer: int
    microbatch: int
    dtype: DType | None
    shape: tuple[int, ...]
    text_len: int
    payload_len: int

    @property
    def has_tensor(self) -> bool:
        return bool(self.flags & FLAG_TENSOR)

    @property
    def tensor_nbytes(self) -> int:
        """Bytes of tensor payload after the prefix (0 when the frame carries no tensor)."""
        return self.payload_len if self.flags & FLAG_TENSOR else 0

    @property
    def prefix_len(self) -> int:
        """Header + text + SYNC payload: everything but the tensor bytes."""
        return HEADER_SIZE + self.text_len + (0 if self.flags & FLAG_TENSOR else self.payload_len)

    @property
    def frame_len(self) -> int:
        return HEADER_SIZE + self.text_len + self.payload_len


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_prefix_checked(msg: Message, sender: int | None) -> bytes:
    """Header + text + SYNC payload of `msg` (everything but the tensor bytes), every field
    checked: ProtocolError names the first one the wire cannot carry. `sender` overrides
    msg.sender. (Transports call `codec.encode_prefix`, which gives the same bytes faster.)"""
    if not isinstance(msg, Message):
        raise ProtocolError(f"can only encode Message, got {type(msg).__name__}")
    try:
        mtype = MsgType(msg.type)
    except ValueError:
        raise ProtocolError(f"cannot encode unknown message type {msg.type!r}") from None
    src = msg.sender if sender is None else sender
    check_int("step", msg.step, INT64_MIN, INT64_MAX)
    check_int("layer", msg.layer, INT32_MIN, INT32_MAX)
    check_int("microbatch", msg.microbatch, INT32_MIN, INT32_MAX)
    check_int("sender", src, 0, UINT32_MAX)
    text = msg.text.encode("utf-8") if msg.text else b""
    if len(text) > MAX_TEXT_BYTES:  # cut on a character boundary
        text = text[:MAX_TEXT_BYTES].decode("utf-8", errors="ignore").encode("utf-8")
    flags, dtype, shape, payload_len, sync_payload = 0, 0, (), 0, b""
    if msg.tensor is not None:
        if msg.sync is not None:
            raise ProtocolError(f"a {mtype.name} message cannot carry both a tensor and a SyncInfo")
        if mtype is MsgType.SYNC_REQUEST:
            raise ProtocolError("SYNC_REQUEST carries a SyncInfo, not a tensor")
        t = msg.tensor
        if t.dim() > MAX_DIMS:
            raise ProtocolError(f"tensor has {t.dim()} dims; the wire carries at most {MAX_DIMS}")
        flags, dtype, shape = FLAG_TENSOR, int(dtype_code(t.dtype)), tuple(t.shape)
        payload_len = t.numel() * t.element_size()
        if extent_bytes(shape, t.element_size()) > MAX_PAYLOAD_BYTES:
            raise ProtocolError(
                f"tensor of shape {shape} spans more than {MAX_PAYLOAD_BYTES} bytes: the wire "
                "cannot describe it"
            )
    elif msg.sync is not None:
        if mtype not in (MsgType.SYNC_REQUEST, MsgType.SYNC_ACK):
            raise ProtocolError(
                f"only SYNC_REQUEST and SYNC_ACK carry a SyncInfo, not {mtype.name}"
            )
        sync_payload = encode_sync(msg.sync)
        flags, payload_len = FLAG_SYNC, len(sync_payload)
    if mtype in TENSOR_TYPES and not flags & FLAG_TENSOR:
        raise ProtocolError(f"{mtype.name} must carry a tensor")
    if mtype is MsgType.SYNC_REQUEST and not flags & FLAG_SYNC:
        raise ProtocolError("SYNC_REQUEST must carry a SyncInfo")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            f"payload of {payload_len} bytes exceeds the wire limit of {MAX_PAYLOAD_BYTES}"
        )
    dims = shape + (0,) * (MAX_DIMS - len(shape))
    header = HEADER.pack(
        MAGIC, VERSION, int(mtype), dtype, len(shape), flags, src, msg.step, msg.layer, msg.microbatch,
        len(text), 0, payload_len, *dims,
    )  # fmt: skip
    return header + text + sync_payload


def extent_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """The bytes a tensor of `shape` would span with every 0 dimension counted as 1: its size
    when it has elements, and for an empty one what bounds its strides. (A header of shape
    (0, 2^40, 2^40) says 0 payload bytes, but no tensor library can build that shape: torch
    raises RuntimeError, numpy ValueError. The wire refuses it instead.)"""
    n = itemsize
    for d in shape:
        n *= d or 1
    return n


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_header(buf: Buffer, max_frame_bytes: int = MAX_FRAME_BYTES) -> FrameHeader:
    """Validate the fixed header at the start of `buf` (which may hold more, or just the header).

    `max_frame_bytes`: the receiver's limit on the whole frame (header, text and payload). A
    receiver of the split form allocates `tensor_nbytes` after this returns, so the limit is
    checked here, before anything is allocated."""
    if len(buf) < HEADER_SIZE:
        raise ProtocolError(
            f"frame of {len(buf)} bytes is shorter than the {HEADER_SIZE}-byte header"
        )
    (magic, version, type_, dtype, ndim, flags, sender, step, layer, microbatch, text_len, reserved,
     payload_len, *dims) = HEADER.unpack_from(buf, 0)  # fmt: skip
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not an AFD frame")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this build speaks {VERSION})")
    mtype = _MSG_TYPES.get(type_)
    if mtype is None:
        raise ProtocolError(f"unknown message type {type_}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:x} in {mtype.name}")
    if flags == FLAG_TENSOR | FLAG_SYNC:
        raise ProtocolError(f"{mtype.name} frame claims both a tensor and a SYNC payload")
    if reserved != 0:
        raise ProtocolError(f"reserved header field is {reserved}, must be 0")
    if text_len > MAX_TEXT_BYTES:
        raise ProtocolError(f"text length {text_len} exceeds {MAX_TEXT_BYTES}")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload length {payload_len} exceeds {MAX_PAYLOAD_BYTES}")
    if HEADER_SIZE + text_len + payload_len > max_frame_bytes:
        raise ProtocolError(
            f"{mtype.name} frame of {HEADER_SIZE + text_len + payload_len} bytes exceeds this "
            f"receiver's max_frame_bytes ({max_frame_bytes})"
        )
    if mtype in TENSOR_TYPES and not flags & FLAG_TENSOR:
        raise ProtocolError(f"{mtype.name} frame carries no tensor")
    if mtype is MsgType.SYNC_REQUEST and not flags & FLAG_SYNC:
        raise ProtocolError("SYNC_REQUEST frame carries no SYNC payload")
    if flags & FLAG_SYNC and mtype not in (MsgType.SYNC_REQUEST, MsgType.SYNC_ACK):
        raise ProtocolError(f"{mtype.name} frame must not carry a SYNC payload")
    if ndim > MAX_DIMS:
        raise ProtocolError(f"ndim {ndim} exceeds {MAX_DIMS}")
    if any(dims[ndim:]):
        raise ProtocolError(f"unused shape entries beyond ndim {ndim} must be 0, got {dims[ndim:]}")
    shape = tuple(dims[:ndim])
    code: DType | None = None
    if flags & FLAG_TENSOR:
        code = DTYPES.get(dtype)
        if code is None:
            raise ProtocolError(f"unknown dtype code {dtype}")
        numel = 1
        for d in shape:
            if d > MAX_DIM:
                raise ProtocolError(f"shape {shape} has a dimension above {MAX_DIM}")
            numel *= d
        if numel * ITEMSIZE[code] != payload_len:
            raise ProtocolError(
                f"payload length {payload_len} does not match shape {shape} x {DTYPE_NAMES[code]} "
                f"({numel * ITEMSIZE[code]} bytes)"
            )
        if not numel and extent_bytes(shape, ITEMSIZE[code]) > MAX_PAYLOAD_BYTES:
            raise ProtocolError(
                f"empty tensor of shape {shape} x {DTYPE_NAMES[code]} spans more than "
                f"{MAX_PAYLOAD_BYTES} bytes with its 0 dimensions counted as 1"
            )
    else:
        if dtype != 0 or ndim != 0:
            raise ProtocolError(
                f"{mtype.name} frame without a tensor has dtype {dtype} / ndim {ndim} (must be 0)"
            )
        if not flags & FLAG_SYNC and payload_len != 0:
            raise ProtocolError(
                f"{mtype.name} frame without payload flags has payload length {payload_len}"
            )
    return FrameHeader(
        mtype, flags, sender, step, layer, microbatch, code, shape, text_len, payload_len
    )


def decode_checked(buf: Buffer, copy: bool) -> Message:
    """Decode one whole frame (`buf` holds exactly one), every check made: ProtocolError names
    the first bad field. The tensor owns its memory unless `copy` is False and `buf` is
    writable: then it is a view of `buf`. (Transports call `codec.decode`, which gives the same
    Message faster.)"""
    header = decode_header(buf)
    if len(buf) != header.frame_len:
        raise ProtocolError(
            f"frame is {len(buf)} bytes but its header says {header.frame_len} "
            f"({HEADER_SIZE} header + {header.text_len} text + {header.payload_len} payload)"
        )
    tensor = None
    if header.has_tensor:
        tensor = tensor_from_buffer(header, buf, header.prefix_len, copy)
    return decode_parts(header, buf, tensor)


def decode_parts(
    header: FrameHeader, prefix: Buffer, tensor_u8: torch.Tensor | np.ndarray | None
) -> Message:
    """Build the Message from a validated header, the prefix bytes (header + text + SYNC payload;
    more may follow) and, for tensor frames, the received tensor bytes (any dtype/shape view of
    exactly `header.tensor_nbytes` bytes; it is reinterpreted, not copied)."""
    if len(prefix) < header.prefix_len:
        raise ProtocolError(
            f"{header.type.name} prefix is {len(prefix)} bytes, header says {header.prefix_len}"
        )
    mv = memoryview(prefix)
    text = ""
    if header.text_len:
        try:
            text = str(mv[HEADER_SIZE : HEADER_SIZE + header.text_len], "utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{header.type.name} text is not valid UTF-8: {e}") from None
    sync = None
    if header.flags & FLAG_SYNC:
        start = HEADER_SIZE + header.text_len
        sync = decode_sync(mv[start : start + header.payload_len])
    tensor = None
    if header.has_tensor:
        if tensor_u8 is None and header.tensor_nbytes == 0:
            import numpy as np

            tensor_u8 = np.empty(0, dtype=np.uint8)
        if tensor_u8 is None:
            raise ProtocolError(
                f"{header.type.name} frame needs its {header.tensor_nbytes} tensor bytes"
            )
        tensor = view_tensor(header, tensor_u8)
    elif tensor_u8 is not None and len(tensor_u8):
        raise ProtocolError(f"{header.type.name} frame has no tensor but tensor bytes were given")
    return Message(
        header.type, header.step, header.layer, header.microbatch, header.sender, tensor, sync, text
    )
