"""Tensors as the raw bytes a frame carries, and received bytes as tensors, without copies where
the memory allows it.

A tensor travels as its C-order bytes in the wire dtype's little-endian layout; bf16 as its raw
2-byte patterns. Apart from the frame layout (`protocol`) because every transport moves these
bytes its own way (rings, sockets, device buffers) and only needs the views.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from afdserve.errors import ProtocolError
from afdserve.transport.buffers import HUGE_ALLOC_BYTES, alloc_host_bytes
from afdserve.transport.wire_types import DType, torch_dtype

if TYPE_CHECKING:
    import numpy as np
    import torch

    from afdserve.transport.protocol import FrameHeader

    Buffer = bytes | bytearray | memoryview

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
EMPTY = memoryview(b"")
"""The tensor bytes of a frame without a tensor (or of an empty tensor)."""


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
        return EMPTY
    return memoryview(t.numpy()).cast("B")


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


def from_host_bytes(raw: np.ndarray, code: DType, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of dtype `code` and `shape` over `raw` (uint8, exactly its bytes), no copy."""
    import torch

    t = torch.from_numpy(raw.view(_NP_DTYPES[code]).reshape(shape))
    return t.view(torch.bfloat16) if code is DType.BFLOAT16 else t


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
        return from_host_bytes(raw, header.dtype, header.shape)
    if raw.dtype != torch.uint8 or raw.numel() != n:
        raise ProtocolError(
            f"received {raw.numel() * raw.element_size()} tensor bytes, header says {n}"
        )
    if n == 0:  # zero-size views of empty storage can have stride 0, which dtype views reject
        return torch.empty(header.shape, dtype=torch_dtype(header.dtype), device=raw.device)
    return raw.view(torch_dtype(header.dtype)).view(header.shape)


def tensor_from_buffer(
    header: FrameHeader, buf: Buffer, offset: int, copy: bool
) -> np.ndarray | torch.Tensor:
    """The header's tensor bytes at `offset` of a received frame: a view of `buf` when `copy`
    is False and `buf` is writable, else a copy that owns its memory (huge-page backed from
    HUGE_ALLOC_BYTES on)."""
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
