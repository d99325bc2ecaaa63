"""Constraints on a ratio: the TPOT SLO and each side's memory.

TPOT: a decode step runs every layer, so num_layers * tau must fit the SLO (tau per layer).
Memory: an attention instance holds its weights plus the KV of B slots at theta tokens each
(mean field; individual slots go above theta, so leave headroom or plan with a larger theta);
the FFN instance holds every layer's FFN weights plus the activations of r*B tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from afdserve.planner.roofline import MemoryModel


def tpot_ok(cycle_ms: float, num_layers: int, tpot_slo_ms: float | None) -> bool:
    """True when num_layers * tau fits the SLO (always true without one)."""
    return tpot_slo_ms is None or num_layers * cycle_ms <= tpot_slo_ms


def attention_bytes(memory: MemoryModel, batch: int, theta: float) -> float:
    return memory.attention_fixed_bytes + batch * theta * memory.kv_bytes_per_context_token


def ffn_bytes(memory: MemoryModel, batch: int, r: int) -> float:
    return memory.ffn_fixed_bytes + r * batch * memory.ffn_bytes_per_token


def attention_fits(memory: MemoryModel, batch: int, theta: float) -> bool:
    return attention_bytes(memory, batch, theta) <= memory.attention_capacity_bytes


def ffn_fits(memory: MemoryModel, batch: int, r: int) -> bool:
    return ffn_bytes(memory, batch, r) <= memory.ffn_capacity_bytes


def max_batch(memory: MemoryModel, theta: float) -> int:
    """Largest B whose KV at theta tokens a slot fits next to the attention weights (0: none)."""
    free = memory.attention_capacity_bytes - memory.attention_fixed_bytes
    if free <= 0:
        return 0
    per_slot = theta * memory.kv_bytes_per_context_token
    return int(free // per_slot) if per_slot > 0 else 1 << 30


@dataclass(frozen=True)
class MemoryReport:
    attention_bytes: float
    attention_capacity_bytes: float
    attention_ok: bool
    max_batch: int
    """Largest batch the attention side can hold at theta tokens a slot."""
    ffn_bytes: float
    """At the chosen ratio (or r = 1 when none is feasible)."""
    ffn_capacity_bytes: float
    ffn_ok: bool

    def to_dict(self) -> dict[str, float | int | bool]:
        return {
            "attention_gb": self.attention_bytes / 1e9,
            "attention_capacity_gb": self.attention_capacity_bytes / 1e9,
            "attention_ok": self.attention_ok,
            "max_batch": self.max_batch,
            "ffn_gb": self.ffn_bytes / 1e9,
            "ffn_capacity_gb": self.ffn_capacity_bytes / 1e9,
            "ffn_ok": self.ffn_ok,
        }


def memory_report(memory: MemoryModel, batch: int, theta: float, r: int) -> MemoryReport:
    a = attention_bytes(memory, batch, theta)
    f = ffn_bytes(memory, batch, r)
    return MemoryReport(
        attention_bytes=a,
        attention_capacity_bytes=memory.attention_capacity_bytes,
        attention_ok=a <= memory.attention_capacity_bytes,
        max_batch=max_batch(memory, theta) if math.isfinite(theta) else 0,
        ffn_bytes=f,
        ffn_capacity_bytes=memory.ffn_capacity_bytes,
        ffn_ok=f <= memory.ffn_capacity_bytes,
    )
