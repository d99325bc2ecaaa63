"""Quantised KV cache layers: int8 or fp8 (e4m3) codes with one float32 scale per token and KV head.

Legend: T = tokens, Hkv = KV heads, NB = blocks, BS = block size, Dh = head dim, N = any rows.

`--kv-cache-dtype int8|fp8` stores each layer's K and V as one byte per element, plus a scale
per (KV head, token): a row x [Dh] is stored as codes c = q(x / s) with s = max|x| / QMAX (QMAX
127 for int8, 448, e4m3's largest finite value, for fp8) and read back as c * s in float32. The
attention kernels dequantise the blocks they gather (model/attention.py, csrc/paged_attention.c)
and then run their usual full-precision math, so the rest of the model never sees a code.

Why a scale per token and head, not per block and head:
- A token's codes depend on that token's own row only. A per-block scale would have to grow as
  later tokens arrive in the block, re-quantising the earlier ones: the KV of position p would
  then depend on which tokens follow it, on how the prompt was chunked and on how far decoding
  has got. Per token, quantisation is one more elementwise step of the write, so batch
  invariance and chunking invariance (the exact mode's contract) hold unchanged, and two
  sequences with one prefix hold the same codes for it (what prefix caching shares).
- A token whose row is much larger than its neighbours' (an outlier) coarsens only its own
  row, not the other rows of its block.
- The cost is small: 4 bytes per Dh-byte row, 6.25% at Dh = 64 and 3.1% at Dh = 128 (a block
  scale would cost under 0.1%), so int8 still holds 1.88x (Dh 64) to 1.94x (Dh 128) the blocks
  of a bf16 cache and 3.76x to 3.88x those of an fp32 one.

The fp8 codes are stored as raw bytes (torch.uint8) and viewed as torch.float8_e4m3fn to
convert: torch 2.13's CPU build has no index_copy_ for float8 tensors, and byte copies are the
same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
MIN_AMAX = 2.0**-100
"""A row whose largest |x| is below this (an all-zero row) gets this as its max: its codes are
then 0, its scale a tiny positive number, and no division by zero happens."""


@dataclass(frozen=True)
class KVFormat:
    """How one quantised KV dtype is stored."""

    name: str
    storage: torch.dtype
    """The element dtype of the codes tensor."""
    qmax: float
    """The largest code magnitude: rows are scaled so their max |x| lands here."""
    native_kind: int
    """The native kernel's `kv_kind` for these codes (csrc/paged_attention.c)."""


FORMATS = {
    "int8": KVFormat("int8", torch.int8, INT8_MAX, 3),
    "fp8": KVFormat("fp8", torch.uint8, FP8_E4M3_MAX, 4),
}
"""kv_cache_dtype (EngineConfig's canonical names) -> format; `auto` is not quantised."""
SCALE_DTYPE = torch.float32
SCALE_BYTES = 4


def bytes_per_row(kv_cache_dtype: str, head_dim: int, model_bytes: int) -> int:
    """Bytes one (token, KV head) row of K or V takes: Dh elements of the model dtype under
    `auto`, Dh code bytes plus a float32 scale when quantised."""
    if kv_cache_dtype == "auto":
        return head_dim * model_bytes
    if kv_cache_dtype not in FORMATS:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}")
    return head_dim + SCALE_BYTES


def quantize(
    x: torch.Tensor,  # [N..., Dh] any float dtype
    fmt: KVFormat,
) -> tuple[torch.Tensor, torch.Tensor]:  # codes [N..., Dh] fmt.storage, scale [N...] float32
    """Codes and scales of rows `x`: scale = max|x| / qmax per row, codes = x / scale rounded
    (int8: to nearest, ties to even; fp8: torch's e4m3 rounding, after clamping to +-448).
    Row by row and elementwise only (the max is exact in any order), so a row's codes never
    depend on the other rows."""
    xf = x.float()
    amax = xf.abs().amax(-1).clamp_min(MIN_AMAX)  # [N...]
    scale = amax / fmt.qmax
    y = xf / scale.unsqueeze(-1)  # [N..., Dh], in [-qmax, qmax] up to rounding
    if fmt.name == "int8":
        codes = y.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        codes = y.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, scale


def dequantize(
    codes: torch.Tensor,  # [N..., Dh] fmt.storage
    scale: torch.Tensor,  # [N...] float32
    fmt: KVFormat,
    dtype: torch.dtype,
) -> torch.Tensor:  # [N..., Dh] dtype
    """codes * scale, computed in float32 (the native kernel's arithmetic, bit for bit), then
    cast to `dtype`."""
    values = codes.view(torch.float8_e4m3fn) if fmt.name == "fp8" else codes
    out = values.float().mul_(scale.unsqueeze(-1))
    return out if dtype == torch.float32 else out.to(dtype)


@dataclass(frozen=True)
class QuantizedKV:
    """One layer's K (or V) cache, quantised: `codes` [Hkv, NB, BS, Dh], `scale` [Hkv, NB, BS].

    Stands where a full-precision cache tensor [Hkv, NB, BS, Dh] would: the attention's write
    (`write`) and gather (`gather`) are the only code that looks inside."""

    codes: torch.Tensor  # [Hkv, NB, BS, Dh] int8 or uint8 (fp8 e4m3 bits)
    scale: torch.Tensor  # [Hkv, NB, BS] float32
    fmt: KVFormat

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def write(
        self,
        slots: torch.Tensor,  # [T] int64, block * BS + offset
        x: torch.Tensor,  # [T, Hkv, Dh]
    ) -> None:
        """Quantise this batch's rows and store them at `slots`."""
        n_kv, dh = self.codes.shape[0], self.codes.shape[3]
        codes, scale = quantize(x.transpose(0, 1), self.fmt)  # [Hkv, T, Dh], [Hkv, T]
        self.codes.view(n_kv, -1, dh).index_copy_(1, slots, codes)
        self.scale.view(n_kv, -1).index_copy_(1, slots, scale)

    def gather(
        self,
        blocks: torch.Tensor,  # [n] int64 block ids
        dtype: torch.dtype,
    ) -> torch.Tensor:  # [Hkv, n, BS, Dh] dtype
        """The blocks `blocks`, dequantised: what `cache.index_select(1, blocks)` is for a
        full-precision cache."""
        codes = self.codes.index_select(1, blocks)  # [Hkv, n, BS, Dh]
        scale = self.scale.index_select(1, blocks)  # [Hkv, n, BS]
        return dequantize(codes, scale, self.fmt, dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole layer [Hkv, NB, BS, Dh] in `dtype` (tests and references)."""
        return dequantize(self.codes, self.scale, self.fmt, dtype)
