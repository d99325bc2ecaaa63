"""The paged KV cache tensors of one attention worker (the block allocator hands out indices)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

from afdserve.model.config import ModelConfig
from afdserve.model.kv_quant import FORMATS, SCALE_DTYPE, QuantizedKV, bytes_per_row

KVLayer = torch.Tensor | QuantizedKV
"""One layer's K or V cache: a full-precision tensor, or codes and scales."""


class KVCache:
    """Per layer, K and V caches [Hkv, num_blocks, block_size, Dh], zero-initialised.

    Head-major so that attention reads gathered blocks without a transposing copy.
    `kv_cache_dtype` `auto` (the default) stores them in the model dtype; `int8` and `fp8` store
    each as a `QuantizedKV` (one code byte per element and a float32 scale per token and head,
    model/kv_quant.py), which the attention quantises on write and dequantises on gather.

    Zero init matters: padded reads (masked out) must never see NaN, since 0 * NaN = NaN.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        kv_cache_dtype: str = "auto",
    ) -> None:
        shape = (config.num_key_value_heads, num_blocks, block_size, config.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_cache_dtype = kv_cache_dtype
        layers = range(config.num_hidden_layers)
        if kv_cache_dtype == "auto":
            self.k: list[KVLayer] = [new_cache_tensor(shape, dtype, device) for _ in layers]
            self.v: list[KVLayer] = [new_cache_tensor(shape, dtype, device) for _ in layers]
            return
        if kv_cache_dtype not in FORMATS:
            raise ValueError(
                f"kv_cache_dtype must be auto, {' or '.join(FORMATS)}, got {kv_cache_dtype!r}"
            )
        fmt = FORMATS[kv_cache_dtype]

        def layer() -> QuantizedKV:
            return QuantizedKV(
                new_cache_tensor(shape, fmt.storage, device),  # [Hkv, NB, BS, Dh]
                new_cache_tensor(shape[:3], SCALE_DTYPE, device),  # [Hkv, NB, BS]
                fmt,
            )

        self.k = [layer() for _ in layers]
        self.v = [layer() for _ in layers]

    @staticmethod
    def bytes_per_block(
        config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto"
    ) -> int:
        """Bytes one block takes over every layer, K and V (codes and scales when quantised):
        what a KV memory budget is divided by."""
        elem = torch.tensor([], dtype=dtype).element_size()
        row = bytes_per_row(kv_cache_dtype, config.head_dim, elem)
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * row


MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20


def new_cache_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A zeroed cache tensor; on a Linux CPU, backed by transparent huge pages where the kernel
    allows them (madvise before the first touch). Why: a sequence's blocks lie anywhere in the
    cache, so with 4 KiB pages a decode step's attention takes a TLB miss on nearly every block;
    2 MiB pages took about 10% off the native attention's time on this project's VM
    (BENCHMARKS.md, kernels). The advice is a hint: refused, the tensor is the same."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.device.type == "cpu" and sys.platform == "linux":
        _advise_hugepages(t.data_ptr(), t.numel() * t.element_size())
    return t.zero_()


def _advise_hugepages(ptr: int, nbytes: int) -> bool:
    start = -(-ptr // HUGE_PAGE) * HUGE_PAGE
    end = (ptr + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    libc = _libc()
    if libc is None:
        return False
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) == 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None
