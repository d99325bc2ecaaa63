"""The value types of the wire format's fields: the integer ranges of header and SYNC fields and
the tensor dtype codes (docs/protocol.md).

Apart from `protocol` (the frame layout) because the SYNC payload (`sync_payload`), the tensor
byte views (`tensor_bytes`) and the fast paths (`codec`) check and convert the same types.
"""

from __future__ import annotations

import enum
import functools
from typing import TYPE_CHECKING

from afdserve.errors import ProtocolError

if TYPE_CHECKING:
    import torch

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT32_MAX = (1 << 32) - 1


def check_int(name: str, value: object, lo: int, hi: int) -> None:
    """ProtocolError unless `value` is an int (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{name} {value} is outside [{lo}, {hi}]")


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


ITEMSIZE = {
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
DTYPE_NAMES = {
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
DTYPES = {int(d): d for d in DType}
"""Wire code -> DType, for decoders (a `.get` that answers None for unknown codes)."""


@functools.cache
def torch_dtype(code: DType) -> torch.dtype:
    import torch

    return getattr(torch, DTYPE_NAMES[code])


@functools.cache
def dtype_code(dtype: torch.dtype) -> DType:
    """The wire code of a torch dtype; ProtocolError for dtypes the wire cannot carry."""
    name = str(dtype).removeprefix("torch.")
    for code, n in DTYPE_NAMES.items():
        if n == name:
            return code
    raise ProtocolError(
        f"cannot encode tensors of dtype {dtype}: the wire carries {', '.join(DTYPE_NAMES.values())}"
    )
