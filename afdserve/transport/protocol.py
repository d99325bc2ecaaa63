"""The messages AFD workers exchange, and their binary wire encoding (docs/protocol.md).

Ranks: attention worker k has rank k (0..r-1); FFN worker j has rank r + j.

A frame is a fixed 112-byte little-endian header, then `text_len` bytes of UTF-8 text, then
`payload_len` bytes of payload: a tensor's raw bytes (C order) or a compact SYNC encoding. There
is no pickling anywhere, so a frame from a buggy or hostile peer can at worst be rejected:
`decode` checks every field and raises `ProtocolError` naming the first bad one.

Transports that move the tensor bytes separately (shared-memory rings, NIXL writes, gloo
tensors, ZeroMQ multipart frames) use the split form: `encode_parts` gives the small *prefix*
(header, text and any SYNC payload) and the tensor bytes as a view; the receiver reads the prefix
with `decode_header`, allocates `header.tensor_nbytes` bytes, fills them, and calls
`decode_parts`. Concatenating the two parts gives exactly `encode(msg)`.
"""

from __future__ import annotations

import enum
import functools
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from afdserve.errors import ProtocolError
from afdserve.transport.buffers import HUGE_ALLOC_BYTES, alloc_host_bytes

if TYPE_CHECKING:
    import numpy as np
    import torch

    Buffer = bytes | bytearray | memoryview


class MsgType(enum.IntEnum):
    ACTIVATION_TRANSFER = 1  # A -> F: h after attention, one (step, layer, microbatch)
    ACTIVATION_RESULT = 2  # F -> A: the FFN output y for the same key
    SYNC_REQUEST = 3  # A -> F: a step's microbatch token counts and request ids
    SYNC_ACK = 4  # F -> A: the FFN accepted the step's plan
    HEARTBEAT = 5  # both ways: liveness
    SHUTDOWN = 6  # orderly stop
    ERROR = 7  # a peer reports it dropped or failed something


@dataclass(frozen=True)
class SyncInfo:
    """SYNC_REQUEST payload: how many tokens each microbatch of this step carries, and for whom."""

    tokens_per_microbatch: tuple[int, ...]
    request_ids: tuple[tuple[int, ...], ...] = ()
    """Per microbatch, the sequence ids in it (the FFN side uses them for logging/metrics)."""

    @property
    def num_microbatches(self) -> int:
        return len(self.tokens_per_microbatch)


@dataclass(frozen=True, init=False)
class Message:
    """One frame. `tensor` is set for ACTIVATION_* frames, `sync` for SYNC_REQUEST."""

    type: MsgType
    step: int
    layer: int = 0
    microbatch: int = 0
    sender: int = 0
    tensor: torch.Tensor | None = None
    sync: SyncInfo | None = None
    text: str = ""
    """ERROR / SHUTDOWN reason, HEARTBEAT status."""

    def __init__(
        self,
        type: MsgType,
        step: int,
        layer: int = 0,
        microbatch: int = 0,
        sender: int = 0,
        tensor: torch.Tensor | None = None,
        sync: SyncInfo | None = None,
        text: str = "",
    ) -> None:
        # The generated frozen __init__ goes through object.__setattr__ once per field (1.5 us
        # per message); writing the instance dict directly costs well under half of that. The
        # instance stays frozen: attribute assignment still raises FrozenInstanceError.
        d = self.__dict__
        d["type"] = type
        d["step"] = step
        d["layer"] = layer
        d["microbatch"] = microbatch
        d["sender"] = sender
        d["tensor"] = tensor
        d["sync"] = sync
        d["text"] = text

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """What a receiver waits on: (sender, type, step, layer, microbatch)."""
        return (self.sender, int(self.type), self.step, self.layer, self.microbatch)


# ---------------------------------------------------------------------------------------------
# Wire format constants. Changing any of them is a new protocol VERSION.

MAGIC = b"AFDW"
VERSION = 1
MAX_DIMS = 8
MAX_TEXT_BYTES = 4096
"""Texts (ERROR reasons, HEARTBEAT status) are short; longer ones are cut at encode."""
MAX_PAYLOAD_BYTES = 1 << 40
MAX_DIM = 1 << 40
MAX_MICROBATCHES = 1 << 16
MAX_SYNC_IDS = 1 << 24

FLAG_TENSOR = 1
"""The payload is a tensor's raw bytes (dtype code, ndim and shape describe it)."""
FLAG_SYNC = 2
"""The payload is a SyncInfo (see docs/protocol.md, "SYNC payload")."""
_KNOWN_FLAGS = FLAG_TENSOR | FLAG_SYNC

# magic, version, type, dtype, ndim, flags, sender, step, layer, microbatch, text_len, reserved,
# payload_len, shape[8]
HEADER = struct.Struct("<4sBBBBIIqiiIIQ8Q")
HEADER_SIZE = HEADER.size  # 112
_PLAIN_HEADER = struct.Struct("<4sBBBBIIqiiIIQ64s")
"""HEADER with the shape as one 64-byte field: a frame without payload (HEARTBEAT, SYNC_ACK,
SHUTDOWN, ERROR) has all of it zero, which one bytes comparison checks."""
_ZERO_SHAPE = bytes(8 * MAX_DIMS)
_SYNC_HEAD = struct.Struct("<II")  # num_microbatches, has_request_ids
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_UINT32_MAX = (1 << 32) - 1


class DType(enum.IntEnum):
    """Wire dtype codes. bf16 travels as its raw 2-byte patterns (no numpy type is involved)."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    FLOAT64 = 4
    INT64 = 5
    INT32 = 6
    INT16 = 7
    INT8 = 8
    UINT8 = 9
    BOOL = 10


_ITEMSIZE = {
    DType.FLOAT32: 4,
    DType.FLOAT16: 2,
    DType.BFLOAT16: 2,
    DType.FLOAT64: 8,
    DType.INT64: 8,
    DType.INT32: 4,
    DType.INT16: 2,
    DType.INT8: 1,
    DType.UINT8: 1,
    DType.BOOL: 1,
}
_DTYPE_NAMES = {
    DType.FLOAT32: "float32",
    DType.FLOAT16: "float16",
    DType.BFLOAT16: "bfloat16",
    DType.FLOAT64: "float64",
    DType.INT64: "int64",
    DType.INT32: "int32",
    DType.INT16: "int16",
    DType.INT8: "int8",
    DType.UINT8: "uint8",
    DType.BOOL: "bool",
}


_NP_DTYPES = {  # numpy views of received bytes; bf16 as int16, then a torch dtype view
    DType.FLOAT32: "<f4",
    DType.FLOAT16: "<f2",
    DType.BFLOAT16: "<i2",
    DType.FLOAT64: "<f8",
    DType.INT64: "<i8",
    DType.INT32: "<i4",
    DType.INT16: "<i2",
    DType.INT8: "i1",
    DType.UINT8: "u1",
    DType.BOOL: "?",
}
_MSG_TYPES = {int(t): t for t in MsgType}
_DTYPES = {int(d): d for d in DType}
_PLAIN_TYPES = {
    int(t): t for t in (MsgType.SYNC_ACK, MsgType.HEARTBEAT, MsgType.SHUTDOWN, MsgType.ERROR)
}
"""The types a frame may carry without any payload (the others need a tensor or a SyncInfo)."""
_ACTIVATION_TYPES = {int(t): t for t in (MsgType.ACTIVATION_TRANSFER, MsgType.ACTIVATION_RESULT)}
"""The hot tensor frames, which `encode_prefix` packs on a fast path."""
_DIMS = struct.Struct(f"<{MAX_DIMS}Q")
_NO_DIMS = tuple((0,) * (MAX_DIMS - n) for n in range(MAX_DIMS + 1))  # shape padding by ndim


def itemsize(code: DType) -> int:
    return _ITEMSIZE[code]


@functools.cache
def torch_dtype(code: DType) -> torch.dtype:
    import torch

    return getattr(torch, _DTYPE_NAMES[code])


@functools.cache
def dtype_code(dtype: torch.dtype) -> DType:
    """The wire code of a torch dtype; ProtocolError for dtypes the wire cannot carry."""
    name = str(dtype).removeprefix("torch.")
    for code, n in _DTYPE_NAMES.items():
        if n == name:
            return code
    raise ProtocolError(
        f"cannot encode tensors of dtype {dtype}: the wire carries {', '.join(_DTYPE_NAMES.values())}"
    )


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


def encode(msg: Message, *, sender: int | None = None) -> bytes:
    """The whole frame as one bytes object (copies the tensor; sockets use `encode_parts`)."""
    prefix, payload = encode_parts(msg, sender=sender)
    return prefix + bytes(payload) if len(payload) else prefix


def encode_parts(msg: Message, *, sender: int | None = None) -> tuple[bytes, memoryview]:
    """(prefix, tensor bytes): prefix = header + text + SYNC payload; tensor bytes are a flat
    byte view of the (contiguous, CPU) tensor, so the caller keeps it unmodified until sent.

    `sender` overrides msg.sender: a transport stamps its own rank so receivers can trust it.
    """
    payload = tensor_payload(msg.tensor) if msg.tensor is not None else _EMPTY
    return encode_prefix(msg, sender=sender), payload


def encode_prefix(msg: Message, *, sender: int | None = None) -> bytes:
    """Header + text + SYNC payload of `msg` (everything but the tensor bytes)."""
    if type(msg) is Message and msg.tensor is not None:
        header = _encode_activation(msg, sender)
        if header is not None:
            return header
    elif type(msg) is Message and msg.sync is None:
        # Fast path for frames without payload (heartbeats, acks, ...): the same checks as
        # below, on exact ints only; anything unusual (or invalid) takes the full path.
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
            and _INT64_MIN <= step <= _INT64_MAX
            and _INT32_MIN <= layer <= _INT32_MAX
            and _INT32_MIN <= mb <= _INT32_MAX
            and 0 <= src <= _UINT32_MAX
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
    return _encode_prefix_checked(msg, sender)


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
        or not _INT64_MIN <= step <= _INT64_MAX
        or not _INT32_MIN <= layer <= _INT32_MAX
        or not _INT32_MIN <= mb <= _INT32_MAX
        or not 0 <= src <= _UINT32_MAX
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
    if nbytes > MAX_PAYLOAD_BYTES:
        return None
    return HEADER.pack(
        MAGIC, VERSION, code, dcode, ndim, FLAG_TENSOR, src, step, layer, mb, 0, 0, nbytes,
        *shape, *_NO_DIMS[ndim],
    )  # fmt: skip


def _encode_prefix_checked(msg: Message, sender: int | None) -> bytes:
    if not isinstance(msg, Message):
        raise ProtocolError(f"can only encode Message, got {type(msg).__name__}")
    try:
        mtype = MsgType(msg.type)
    except ValueError:
        raise ProtocolError(f"cannot encode unknown message type {msg.type!r}") from None
    src = msg.sender if sender is None else sender
    _check_int("step", msg.step, _INT64_MIN, _INT64_MAX)
    _check_int("layer", msg.layer, _INT32_MIN, _INT32_MAX)
    _check_int("microbatch", msg.microbatch, _INT32_MIN, _INT32_MAX)
    _check_int("sender", src, 0, _UINT32_MAX)
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
    elif msg.sync is not None:
        if mtype not in (MsgType.SYNC_REQUEST, MsgType.SYNC_ACK):
            raise ProtocolError(
                f"only SYNC_REQUEST and SYNC_ACK carry a SyncInfo, not {mtype.name}"
            )
        sync_payload = encode_sync(msg.sync)
        flags, payload_len = FLAG_SYNC, len(sync_payload)
    if (
        mtype in (MsgType.ACTIVATION_TRANSFER, MsgType.ACTIVATION_RESULT)
        and not flags & FLAG_TENSOR
    ):
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


def tensor_payload(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes as a flat byte memoryview of host memory (a view when the tensor is
    already contiguous on the CPU; otherwise of a contiguous CPU copy, which the view keeps alive).

    bf16 is reinterpreted as int16 first (numpy has no bf16): raw 2-byte patterns travel.
    """
    import torch

    if sys.byteorder != "little":  # the wire is little-endian and tensors travel as raw bytes
        raise ProtocolError("the AFD wire format needs a little-endian host")
    t = tensor
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        from afdserve.transport.staging import to_host

        t = to_host(t)  # through page-locked memory from a GPU
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.numel() == 0:
        return _EMPTY
    return memoryview(t.numpy()).cast("B")


_EMPTY = memoryview(b"")


def tensor_u8(tensor: torch.Tensor, *, device: str | None = "cpu") -> torch.Tensor:
    """A tensor's bytes as a flat contiguous uint8 tensor (a view when no copy is needed), on
    `device` (None keeps the tensor's own device, for transports that move device memory)."""
    import torch

    if sys.byteorder != "little":
        raise ProtocolError("the AFD wire format needs a little-endian host")
    t = tensor.detach()
    if device is not None and t.device.type != device:
        from afdserve.transport.staging import to_host

        t = to_host(t) if device == "cpu" else t.to(device)
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    t = t.contiguous().view(-1)  # [N]
    return t.view(torch.uint8)  # [N * itemsize]


def encode_sync(sync: SyncInfo) -> bytes:
    if not isinstance(sync, SyncInfo):
        raise ProtocolError(f"sync must be a SyncInfo, got {type(sync).__name__}")
    tokens = tuple(sync.tokens_per_microbatch)
    ids = tuple(tuple(x) for x in sync.request_ids)
    m = len(tokens)
    if m > MAX_MICROBATCHES:
        raise ProtocolError(
            f"SyncInfo has {m} microbatches; the wire carries at most {MAX_MICROBATCHES}"
        )
    for n in tokens:
        _check_int("tokens_per_microbatch entry", n, 0, (1 << 32) - 1)
    if ids and len(ids) != m:
        raise ProtocolError(
            f"SyncInfo.request_ids has {len(ids)} lists for {m} microbatches (must match, or be empty)"
        )
    flat = [i for group in ids for i in group]
    if len(flat) > MAX_SYNC_IDS:
        raise ProtocolError(
            f"SyncInfo carries {len(flat)} request ids; the wire carries at most {MAX_SYNC_IDS}"
        )
    for i in flat:
        _check_int("request id", i, _INT64_MIN, _INT64_MAX)
    out = _SYNC_HEAD.pack(m, 1 if ids else 0) + struct.pack(f"<{m}I", *tokens)
    if ids:
        out += struct.pack(f"<{m}I", *(len(g) for g in ids)) + struct.pack(f"<{len(flat)}q", *flat)
    return out


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{name} {value} is outside [{lo}, {hi}]")


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_header(buf: Buffer) -> FrameHeader:
    """Validate the fixed header at the start of `buf` (which may hold more, or just the header)."""
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
    if (
        mtype in (MsgType.ACTIVATION_TRANSFER, MsgType.ACTIVATION_RESULT)
        and not flags & FLAG_TENSOR
    ):
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
        code = _DTYPES.get(dtype)
        if code is None:
            raise ProtocolError(f"unknown dtype code {dtype}")
        numel = 1
        for d in shape:
            if d > MAX_DIM:
                raise ProtocolError(f"shape {shape} has a dimension above {MAX_DIM}")
            numel *= d
        if numel * _ITEMSIZE[code] != payload_len:
            raise ProtocolError(
                f"payload length {payload_len} does not match shape {shape} x {_DTYPE_NAMES[code]} "
                f"({numel * _ITEMSIZE[code]} bytes)"
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
    return _decode_checked(buf, copy)


def _decode_activation(
    buf: Buffer, type_: int, dtype: int, ndim: int, sender: int, step: int, layer: int,
    microbatch: int, text_len: int, reserved: int, payload_len: int, shape: bytes, magic: bytes,
    version: int,
) -> Message | None:  # fmt: skip
    """decode's fast path for a whole ACTIVATION_TRANSFER/RESULT frame (no text, a non-empty
    tensor below HUGE_ALLOC_BYTES): decode_header's checks, fused, and one copy of the tensor
    bytes. None sends the frame to the checked path, which names what is wrong with it."""
    mtype = _ACTIVATION_TYPES.get(type_)
    code = _DTYPES.get(dtype)
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
    if numel * _ITEMSIZE[code] != payload_len:
        return None
    import numpy as np

    raw = np.frombuffer(buf, dtype=np.uint8, count=payload_len, offset=HEADER_SIZE).copy()
    return Message(mtype, step, layer, microbatch, sender, _from_host_bytes(raw, code, dims[:ndim]))


def _from_host_bytes(raw: np.ndarray, code: DType, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of dtype `code` and `shape` over `raw` (uint8, exactly its bytes), no copy."""
    import torch

    t = torch.from_numpy(raw.view(_NP_DTYPES[code]).reshape(shape))
    return t.view(torch.bfloat16) if code is DType.BFLOAT16 else t


def _decode_checked(buf: Buffer, copy: bool) -> Message:
    """decode without the fast path: every check, with an error naming the first bad field."""
    header = decode_header(buf)
    if len(buf) != header.frame_len:
        raise ProtocolError(
            f"frame is {len(buf)} bytes but its header says {header.frame_len} "
            f"({HEADER_SIZE} header + {header.text_len} text + {header.payload_len} payload)"
        )
    tensor = None
    if header.has_tensor:
        tensor = _tensor_from_buffer(header, buf, header.prefix_len, copy)
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


def view_tensor(header: FrameHeader, raw: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Reinterpret received bytes (a uint8 numpy array or tensor, any device) as the header's
    dtype and shape, without copying. (Host arrays are viewed with numpy first: a numpy
    view+reshape costs well under a microsecond, torch's view(dtype).view(shape) several.)"""
    import numpy as np
    import torch

    assert header.dtype is not None
    n = header.tensor_nbytes
    if isinstance(raw, np.ndarray):
        if raw.dtype != np.uint8 or raw.size != n:
            raise ProtocolError(f"received {raw.nbytes} tensor bytes, header says {n}")
        if n == 0:
            return torch.empty(header.shape, dtype=torch_dtype(header.dtype))
        return _from_host_bytes(raw, header.dtype, header.shape)
    if raw.dtype != torch.uint8 or raw.numel() != n:
        raise ProtocolError(
            f"received {raw.numel() * raw.element_size()} tensor bytes, header says {n}"
        )
    if n == 0:  # zero-size views of empty storage can have stride 0, which dtype views reject
        return torch.empty(header.shape, dtype=torch_dtype(header.dtype), device=raw.device)
    return raw.view(torch_dtype(header.dtype)).view(header.shape)


def _tensor_from_buffer(
    header: FrameHeader, buf: Buffer, offset: int, copy: bool
) -> np.ndarray | torch.Tensor:
    import numpy as np

    n = header.tensor_nbytes
    src = np.frombuffer(buf, dtype=np.uint8, count=n, offset=offset)  # [n]
    if not copy and src.flags.writeable:
        return src
    if n < HUGE_ALLOC_BYTES:
        return src.copy()
    out = alloc_host_bytes(n)  # [n] uint8
    out.numpy()[:] = src
    return out


def decode_sync(buf: Buffer) -> SyncInfo:
    mv = memoryview(buf)
    if len(mv) < _SYNC_HEAD.size:
        raise ProtocolError(
            f"SYNC payload of {len(mv)} bytes is shorter than its {_SYNC_HEAD.size}-byte head"
        )
    m, has_ids = _SYNC_HEAD.unpack_from(mv, 0)
    if m > MAX_MICROBATCHES:
        raise ProtocolError(f"SYNC payload claims {m} microbatches (at most {MAX_MICROBATCHES})")
    if has_ids not in (0, 1):
        raise ProtocolError(f"SYNC has_request_ids is {has_ids}, must be 0 or 1")
    pos = _SYNC_HEAD.size
    need = pos + 4 * m * (1 + has_ids)
    if len(mv) < need:
        raise ProtocolError(f"SYNC payload of {len(mv)} bytes is too short for {m} microbatches")
    tokens = struct.unpack_from(f"<{m}I", mv, pos)
    pos += 4 * m
    ids: tuple[tuple[int, ...], ...] = ()
    if has_ids:
        counts = struct.unpack_from(f"<{m}I", mv, pos)
        pos += 4 * m
        total = sum(counts)
        if total > MAX_SYNC_IDS or len(mv) != pos + 8 * total:
            raise ProtocolError(
                f"SYNC payload is {len(mv)} bytes but its request id counts need {pos + 8 * total}"
            )
        flat = struct.unpack_from(f"<{total}q", mv, pos)
        groups, i = [], 0
        for c in counts:
            groups.append(tuple(flat[i : i + c]))
            i += c
        ids = tuple(groups)
    elif len(mv) != pos:
        raise ProtocolError(f"SYNC payload is {len(mv)} bytes, expected {pos}")
    return SyncInfo(tuple(tokens), ids)
