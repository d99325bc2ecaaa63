"""Host memory for received tensors.

A received tensor is memory the caller owns. Fresh allocations are expensive for large frames:
glibc serves allocations above its mmap threshold (at most 32 MiB) with a new mmap every time,
and first-touch page faults then cost more than the copy itself (measured on the dev box: 64 MiB
copied into a fresh torch.empty ran at 1.5 GB/s against 7.8 GB/s into a reused buffer). So:

- `alloc_host_bytes` backs large buffers by an anonymous mmap advised MADV_HUGEPAGE (6 GB/s
  fresh on the same box); the tensor keeps the mapping alive.
- `RecvBufferPool` hands out buffers again once nothing references them any more. A received
  tensor is a view of a pooled numpy array, and every view (torch or numpy) holds a reference to
  that array, so CPython's reference count says exactly when the caller has let go of all of
  them; only then is the memory reused. Steady-state traffic (the same activation shapes every
  layer) then runs without allocating or faulting at all.
"""

from __future__ import annotations

import mmap
import sys
import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

HUGE_ALLOC_BYTES = 32 << 20
"""From this size on, receive buffers are huge-page backed anonymous mappings."""


def alloc_host_bytes(nbytes: int) -> torch.Tensor:
    """A new, uninitialised, writable CPU uint8 tensor of `nbytes` bytes."""
    import torch

    if nbytes < HUGE_ALLOC_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.from_numpy(_huge_array(nbytes))


def _huge_array(nbytes: int) -> np.ndarray:
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP disabled: plain pages still work
            pass
    return np.frombuffer(mm, dtype=np.uint8)  # [nbytes], keeps `mm` alive


class RecvBufferPool:
    """Reusable receive buffers of at least `min_bytes`, holding at most `max_bytes` in total.

    `take(n)` returns a writable uint8 numpy array of exactly n bytes: a view of a pooled buffer
    (sizes are rounded up to 1/8 steps of a power of two, so slightly different shapes share
    buffers) or, below min_bytes, a plain new array. Thread-safe.
    """

    def __init__(self, max_bytes: int = 512 << 20, min_bytes: int = 256 << 10) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._buffers: list[np.ndarray] = []  # oldest first
        self._total = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def take(self, nbytes: int) -> np.ndarray:
        if nbytes < self.min_bytes:
            return np.empty(nbytes, dtype=np.uint8)
        size = _size_class(nbytes)
        with self._lock:
            for i in range(len(self._buffers)):
                if self._buffers[i].size == size and self._idle(i):
                    buf = self._buffers.pop(i)
                    self._buffers.append(buf)  # most recently used last
                    self.hits += 1
                    return buf[:nbytes]
            self.misses += 1
            buf = _huge_array(size) if size >= HUGE_ALLOC_BYTES else np.empty(size, dtype=np.uint8)
            self._buffers.append(buf)
            self._total += size
            self._evict()
            return buf[:nbytes]

    def _evict(self) -> None:
        """Forget idle buffers, oldest first, while over budget (buffers in use stay)."""
        i = 0
        while self._total > self.max_bytes and i < len(self._buffers):
            if self._idle(i):
                self._total -= self._buffers[i].size
                del self._buffers[i]
            else:
                i += 1

    def _idle(self, i: int) -> bool:
        # references to an idle buffer: our list and getrefcount's argument; a handed-out view
        # (and through it any tensor or array made from it) adds one
        return sys.getrefcount(self._buffers[i]) <= 2

    @property
    def pooled_bytes(self) -> int:
        return self._total


def _size_class(n: int) -> int:
    """n rounded up to the next of 8 evenly spaced steps between powers of two (<= 12.5% slack)."""
    if n <= 8:
        return 8
    top = 1 << (n - 1).bit_length()  # smallest power of two >= n
    step = top // 16  # steps of 1/8 between top/2 and top
    return -(-n // step) * step
