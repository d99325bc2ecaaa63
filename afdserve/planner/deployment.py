"""A roofline deployment: a catalog model on catalog hardware, each side's instance sized to the
fewest devices whose memory holds it, with the coefficients, memory and prices that follow
(`afdserve plan --model`).

Sizing comes first because the coefficients depend on it: an instance of g devices has g times
the FLOP/s and bandwidth. A side's memory need at g = 1 does not depend on g (weights, plus the
KV of B slots at the workload's theta on the attention side, or the activations of B tokens on
the FFN side), so one memory model sizes both before the derivation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from afdserve.planner.costs import StageCosts
from afdserve.planner.expert_parallel import redundant_slots_fit
from afdserve.planner.hardware_catalog import Hardware
from afdserve.planner.model_catalog import ModelSpec
from afdserve.planner.ratio import CostWeights
from afdserve.planner.roofline import (
    DEVICE_COUNTS,
    MemoryModel,
    RooflineDerivation,
    RooflineSetup,
    memory_model,
    roofline_costs,
    smallest_device_count,
    unit_costs,
)


@dataclass(frozen=True)
class RooflineDeployment:
    model: ModelSpec
    attention_hw: Hardware
    ffn_hw: Hardware
    setup: RooflineSetup
    """With the device counts the deployment uses."""
    derivation: RooflineDerivation
    memory: MemoryModel
    notes: tuple[str, ...]
    """How each side was sized (one note per side sized by memory)."""

    @property
    def costs(self) -> StageCosts:
        return self.derivation.costs

    def default_weights(self) -> tuple[CostWeights, str | None]:
        """The objective's weights when no prices are given, and a note saying which: each
        instance's catalog price (its devices' $/h) where both sides have one, else its device
        count where the counts differ, else equal weights (per device is then per instance)."""
        a, f = self.attention_hw, self.ffn_hw
        g_a, g_f = self.setup.attention_devices, self.setup.ffn_devices
        if a.price_per_hour is not None and f.price_per_hour is not None:
            weights = CostWeights(g_a * a.price_per_hour, g_f * f.price_per_hour, "$/h")
            return weights, "instance prices from the hardware catalog"
        if g_a != g_f:
            return (
                CostWeights(float(g_a), float(g_f), "device"),
                "no catalog price for both sides: objective is throughput per device",
            )
        return CostWeights(), None

    def to_dict(self) -> dict[str, Any]:
        """What `afdserve plan --model --json` adds to the plan: model, hardware and device
        counts, the efficiency assumptions, the derivation's terms, Step-3 unit costs of each
        side with a catalog price, and the sizing notes."""
        model = self.model
        unit = {}
        for side, hw in (("attention", self.attention_hw), ("ffn", self.ffn_hw)):
            if hw.price_per_hour is not None:
                u_flop, u_byte = unit_costs(
                    hw.price_per_hour, hw.flops(model.weight_dtype), hw.memory_bw
                )
                unit[side] = {"hardware": hw.name, "usd_per_flop": u_flop, "usd_per_byte": u_byte}
        return {
            "model": {
                "name": model.name,
                "source": model.source,
                "weight_dtype": model.weight_dtype,
                "num_layers": model.num_layers,
                "total_params": model.total_params,
            },
            "hardware": {
                side: {
                    "name": hw.name,
                    "devices": devices,
                    "source": hw.source,
                    "approximate": hw.approximate,
                }
                for side, hw, devices in (
                    ("attention", self.attention_hw, self.setup.attention_devices),
                    ("ffn", self.ffn_hw, self.setup.ffn_devices),
                )
            },
            "efficiency": dataclasses.asdict(self.setup.efficiency),
            "roofline": self.derivation.to_dict(),
            "unit_costs": unit,
            "expert_parallel": self.expert_parallel(),
            "sizing_notes": list(self.notes),
        }

    def expert_parallel(self) -> dict[str, Any] | None:
        return expert_parallel_summary(self.model, self.setup, self.derivation)


def expert_parallel_summary(
    model: ModelSpec, setup: RooflineSetup, derivation: RooflineDerivation
) -> dict[str, Any] | None:
    """What the FFN's expert parallelism assumes (None for a dense model): its devices, the
    expected dispatch fan-out, the imbalance factor used (and the one given, which the device
    count caps), the redundant slots and the expert slots each device holds on average,
    (E + R) / m."""
    if not model.is_moe:
        return None
    terms = derivation.terms
    return {
        "ffn_devices": setup.ffn_devices,
        "num_experts": model.num_experts,
        "top_k": model.experts_per_token,
        "fanout": terms["comm_fanout"],
        "expert_imbalance": terms["expert_imbalance"],
        "expert_imbalance_given": setup.expert_imbalance,
        "redundant_experts": setup.redundant_experts,
        "slots_per_device": (model.num_experts + setup.redundant_experts) / setup.ffn_devices,
    }


def roofline_deployment(
    model: ModelSpec,
    attention_hw: Hardware,
    ffn_hw: Hardware,
    setup: RooflineSetup,
    theta: float,
    *,
    attention_devices: int | None = None,
    ffn_devices: int | None = None,
) -> RooflineDeployment:
    """`model` with attention on `attention_hw` and the FFN on `ffn_hw`, serving `setup.batch`
    slots per attention instance at `theta` context tokens per slot. A side whose device count
    is None spans the fewest devices (in DEVICE_COUNTS) whose usable memory holds it, or one if
    none does (the memory model then says it does not fit); `setup`'s own counts are replaced."""
    need = memory_model(model, attention_hw, ffn_hw, setup)
    notes = []
    g_a = attention_devices
    if g_a is None:
        kv = setup.batch * theta * need.kv_bytes_per_context_token
        usable = setup.efficiency.usable_memory
        g_a = (
            smallest_device_count(
                need.attention_fixed_bytes + kv, attention_hw.memory_bytes, usable
            )
            or 1
        )
        notes.append(f"attention instance sized to {g_a} x {attention_hw.name} by memory")
    g_f = ffn_devices
    if g_f is None:
        act = setup.batch * need.ffn_bytes_per_token
        usable = setup.efficiency.usable_memory
        g_f = smallest_device_count(need.ffn_fixed_bytes + act, ffn_hw.memory_bytes, usable) or 1
        R = setup.redundant_experts
        if model.is_moe and R and not redundant_slots_fit(model.num_experts, g_f, R):
            fits = [g for g in DEVICE_COUNTS if redundant_slots_fit(model.num_experts, g, R)]
            g_f = next((g for g in fits if g > g_f), g_f)
            notes.append(
                f"FFN instance sized to {g_f} x {ffn_hw.name} by memory and {R} redundant experts"
            )
        else:
            notes.append(f"FFN instance sized to {g_f} x {ffn_hw.name} by memory")
    sized = dataclasses.replace(setup, attention_devices=g_a, ffn_devices=g_f)
    return RooflineDeployment(
        model=model,
        attention_hw=attention_hw,
        ffn_hw=ffn_hw,
        setup=sized,
        derivation=roofline_costs(model, attention_hw, ffn_hw, sized),
        memory=memory_model(model, attention_hw, ffn_hw, sized),
        notes=tuple(notes),
    )
