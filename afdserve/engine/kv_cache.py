"""The paged KV cache tensors of one attention worker (the block allocator hands out indices)."""

from __future__ import annotations

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
        self.k = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * block_size * config.kv_size * elem
