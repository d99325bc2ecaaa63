"""BlockAllocator: the free list of one attention worker's paged KV cache.

Block ids index the first dimension of the runner's KV tensors (`[num_blocks, block_size, ...]`).
Block 0 (`NULL_BLOCK`) is reserved and never allocated: runners pad block tables with it so
that batched gathers over padded tables stay in bounds, and nothing real ever lives there.
"""

from __future__ import annotations

from collections.abc import Iterable

from afdserve.errors import AfdserveError

NULL_BLOCK = 0
"""The reserved padding block id; never handed out."""


class NoFreeBlocksError(AfdserveError):
    """An allocation asked for more blocks than are free (callers check `can_allocate` first)."""


class BlockAllocator:
    """Fixed pool of physical block ids 1..num_blocks-1; O(1) allocate and free.

    Freed blocks are reused first (LIFO), which keeps a small working set warm in caches.
    Every misuse (double free, freeing the null block or an unknown id) raises at once, since a
    block handed to two sequences would silently corrupt both their outputs.
    """

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(
                f"num_blocks must be an integer >= 2 (block 0 is reserved), got {num_blocks!r}"
            )
        self.num_blocks = num_blocks
        # stack: pop() hands out the lowest ids first on a fresh pool
        self._free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._is_free: list[bool] = [False] + [True] * (num_blocks - 1)

    @property
    def num_usable(self) -> int:
        """Blocks that can ever be allocated (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use, in [0, 1]."""
        return self.num_used / self.num_usable

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks; all or nothing."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"cannot allocate {n!r} blocks")
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV blocks but only {len(self._free)} are free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._is_free[b] = False
        return out

    def free(self, blocks: Iterable[int]) -> None:
        """Return blocks to the pool; all or nothing (validated before any is freed)."""
        blocks = list(blocks)
        seen: set[int] = set()
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 < b < self.num_blocks:
                raise ValueError(
                    f"block id {b!r} is not an allocatable block (1..{self.num_blocks - 1})"
                )
            if self._is_free[b] or b in seen:
                raise ValueError(f"double free of KV block {b}")
            seen.add(b)
        for b in blocks:
            self._is_free[b] = True
            self._free.append(b)
