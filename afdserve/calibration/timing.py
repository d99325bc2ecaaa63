"""How the profile times a part: the least-disturbed of `repeats` runs after a warm-up (CUDA:
synchronised), and the KV blocks the timed caches and engines are sized by.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Timer:
    """Times callables on `device`: `best_ms` of `repeats` runs after `warmup` runs."""

    def __init__(self, device: str, repeats: int, warmup: int) -> None:
        import torch

        self.repeats, self.warmup = repeats, warmup
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def best_ms(self, fn: Callable[[], Any]) -> float:
        """The least-disturbed time of `fn` (ms) over the repeats, after the warm-up."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3


def blocks_for(n_tokens: int, block_size: int) -> int:
    """KV blocks of `block_size` tokens that hold `n_tokens`."""
    return -(-n_tokens // block_size)
