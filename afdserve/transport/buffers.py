"""Host memory for received tensors.

A received tensor is a fresh allocation that the caller owns. glibc serves allocations above its
mmap threshold (at most 32 MiB) with a new mmap every time, and first-touch page faults on 4 KiB
pages then cost more than the copy itself (measured on the dev box: 64 MiB copied into a fresh
torch.empty ran at 1.5 GB/s against 7.8 GB/s into a reused buffer). Large buffers therefore come
from an anonymous mmap advised MADV_HUGEPAGE (6 GB/s fresh): the tensor keeps the mapping alive
and it is unmapped when the last view of it dies.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

HUGE_ALLOC_BYTES = 32 << 20
"""From this size on, receive buffers are huge-page backed anonymous mappings."""


def alloc_host_bytes(nbytes: int) -> torch.Tensor:
    """A new, uninitialised, writable CPU uint8 tensor of `nbytes` bytes."""
    import torch

    if nbytes < HUGE_ALLOC_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP disabled: plain pages still work
        pass
    return torch.frombuffer(mm, dtype=torch.uint8)  # [nbytes], keeps `mm` alive
