"""The paged KV cache tensors of one attention worker (the block allocator hands out indices)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

from afdserve.model.config import ModelConfig


class KVCache:
    """Per layer, K and V tensors [Hkv, num_blocks, block_size, Dh], zero-initialised.

    Head-major so that attention reads gathered blocks without a transposing copy.

    Zero init matters: padded reads (masked out) must never see NaN, since 0 * NaN = NaN.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.num_key_value_heads, num_blocks, block_size, config.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = [new_cache_tensor(shape, dtype, device) for _ in range(config.num_hidden_layers)]
        self.v = [new_cache_tensor(shape, dtype, device) for _ in range(config.num_hidden_layers)]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * block_size * config.kv_size * elem


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
