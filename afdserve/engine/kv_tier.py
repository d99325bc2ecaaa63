"""The KV host tier's tensors: a second, larger pool of KV blocks in host memory.

The scheduler's `BlockPool` decides which cached blocks go out to the tier and come back
(engine/prefix_cache.py); each step's plan names those copies (`StepPlan.swap_out`, `swap_in`)
and the runner makes them here before anything else in the step: outs first (the device blocks
they read are written by this step), then ins (this step's chunks read them). A copy is
exact, so a block brought back holds the bits it left with.

The tier mirrors the device cache's layout per layer, [Hkv, num_slots, block_size, Dh], in
the cache's dtype, on the CPU (pinned when the cache is on a GPU, so copies can overlap). A
quantised cache (`QuantizedKV`) is mirrored tensor by tensor: its codes and its scales
[Hkv, num_slots, block_size], so a block comes back with the codes and scales it left with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from afdserve.engine.kv_cache import KVCache, KVLayer
from afdserve.model.kv_quant import QuantizedKV


def layer_tensors(layer: KVLayer) -> tuple[torch.Tensor, ...]:
    """The tensors that hold one layer's K or V blocks, each indexed [Hkv, block, ...]."""
    if isinstance(layer, QuantizedKV):
        return (layer.codes, layer.scale)
    return (layer,)


def cache_tensors(kv: KVCache) -> list[torch.Tensor]:
    """Every tensor of the cache, K then V, layer by layer, in one fixed order."""
    return [t for layer in (*kv.k, *kv.v) for t in layer_tensors(layer)]


class HostKVTier:
    def __init__(self, kv: KVCache, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots!r}")
        self.num_slots = num_slots
        dev_tensors = cache_tensors(kv)
        self.device = dev_tensors[0].device
        pin = self.device.type == "cuda"

        def like(t: torch.Tensor) -> torch.Tensor:
            shape = (t.shape[0], num_slots, *t.shape[2:])
            return torch.zeros(shape, dtype=t.dtype, pin_memory=pin)

        self.tensors = [like(t) for t in dev_tensors]  # the order of cache_tensors(kv)
        self._done_step: int | None = None

    def apply(
        self,
        kv: KVCache,
        step_id: int,
        swap_out: Sequence[tuple[int, int]],
        swap_in: Sequence[tuple[int, int]],
    ) -> None:
        """Make step `step_id`'s copies, once: a step run again after an interruption must not
        copy out device blocks its first run already wrote."""
        if self._done_step == step_id or not (swap_out or swap_in):
            return
        if swap_out:
            dev = torch.tensor([d for d, _ in swap_out], device=self.device)  # [n]
            host = torch.tensor([h for _, h in swap_out])  # [n]
            for src, dst in zip(cache_tensors(kv), self.tensors, strict=True):
                dst[:, host] = src[:, dev].to("cpu")  # [Hkv, n, B, Dh] (scales [Hkv, n, B])
        if swap_in:
            host = torch.tensor([h for h, _ in swap_in])
            dev = torch.tensor([d for _, d in swap_in], device=self.device)
            for src, dst in zip(self.tensors, cache_tensors(kv), strict=True):
                dst[:, dev] = src[:, host].to(self.device, non_blocking=True)
        self._done_step = step_id
