"""Where a group's experts start: contiguous blocks of each MoE layer's experts over the m FFN
workers, before any load has been seen (torch-free: the front computes it too)."""

from __future__ import annotations

from afdserve.eplb.placement import Placement
from afdserve.model.config import ModelConfig


def initial_placement(ffn_workers: int, model: ModelConfig) -> Placement | None:
    """The starting placement; None when nothing is placed: one FFN worker, or a dense model."""
    if ffn_workers == 1 or not model.is_moe:
        return None
    moe = [model.is_moe_layer(i) for i in range(model.num_hidden_layers)]
    return Placement.static(moe, model.num_experts, ffn_workers)
