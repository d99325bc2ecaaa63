"""Roofline stage coefficients from a model spec and hardware specs (see docs/planner.md).

Per layer, for an instance of g devices acting as one (ideal tensor/expert parallelism, so peak
FLOP/s, memory bandwidth and NIC bandwidth add up), with F = g * peak FLOP/s * eff_flops,
M = g * memory bandwidth * eff_memory_bw, N = g * link bandwidth * eff_link:

    alpha_A = max(kv_bytes_per_token / M, attn_flops_per_token / F)       per context token
    beta_A  = max(W_attn / M, 2 * P_attn * B / F) + max(W_head / M, 2 * P_head * B / F) / L
    alpha_F = 2 * P_ffn_active / F                                        per token
    beta_F  = W_ffn_total / M                                             (every expert streamed)
    alpha_C = hidden * act_bytes * fanout / N                             per token, one way
    beta_C  = link latency

Each term is one kernel's own roofline (the larger of its memory time and its compute time); the
terms add because the kernels run one after another. The FFN's affine form adds weight streaming
and compute instead of taking their maximum, which is exact at both ends and at most 2x high at
the ridge point. The efficiency factors are assumptions, not measurements; a measured profile
(`afdserve profile`) replaces all of this.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from afdserve.errors import UserInputError
from afdserve.planner.costs import Affine, StageCosts
from afdserve.planner.expert_parallel import check_ep, expected_fanout
from afdserve.planner.hardware_catalog import Hardware
from afdserve.planner.model_catalog import DTYPE_BYTES, ModelSpec

MS = 1e3  # seconds -> milliseconds
DEVICE_COUNTS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak that kernels reach, and other assumptions of the roofline (documented
    defaults; override them, or better, measure a profile)."""

    flops: float = 0.6
    """Fraction of peak tensor FLOP/s reached by decode-sized GEMMs (assumed)."""
    memory_bw: float = 0.8
    """Fraction of peak memory bandwidth reached when streaming weights and KV (assumed)."""
    link: float = 0.8
    """Fraction of link bandwidth reached by activation transfers (assumed)."""
    link_latency_ms: float = 0.01
    """Fixed cost of one transfer per layer, ms (assumed: a few microseconds of RDMA latency
    plus software overhead)."""
    usable_memory: float = 0.9
    """Fraction of device memory available to weights, KV and activations (assumed)."""

    def __post_init__(self) -> None:
        for name in ("flops", "memory_bw", "link", "usable_memory"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise UserInputError(f"efficiency {name} must be in (0, 1], got {v!r}")
        if not (math.isfinite(self.link_latency_ms) and self.link_latency_ms >= 0):
            raise UserInputError(f"link latency must be >= 0 ms, got {self.link_latency_ms!r}")


@dataclass(frozen=True)
class RooflineSetup:
    """Everything the roofline derivation depends on besides the model and the hardware."""

    batch: int
    attention_devices: int = 1
    ffn_devices: int = 1
    kv_dtype: str = "bf16"
    activation_dtype: str = "bf16"
    link: str = "scale-out"
    """Which link carries activations between the two sides: 'scale-out' or 'scale-up'."""
    link_bw: float | None = None
    """Override of the per-device, per-direction link bandwidth in bytes/s."""
    comm_scales_with: str = "B"
    efficiency: Efficiency = field(default_factory=Efficiency)
    expert_imbalance: float = 1.0
    """MoE under EP: max/mean expert load over the FFN devices (1 = balanced); scales alpha_F
    (planner/expert_parallel.py). The runtime measures it: afdserve:ffn_expert_imbalance."""
    redundant_experts: int = 0
    """MoE under EP: extra expert slots per layer over the FFN devices (EPLB's replicas); each
    adds one expert's weights to beta_F and to the FFN's memory."""

    def __post_init__(self) -> None:
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise UserInputError(f"batch must be an integer >= 1, got {self.batch!r}")
        for name in ("attention_devices", "ffn_devices"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserInputError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("kv_dtype", "activation_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise UserInputError(
                    f"{name} must be one of {', '.join(DTYPE_BYTES)}, got {getattr(self, name)!r}"
                )
        if self.link not in ("scale-up", "scale-out"):
            raise UserInputError(f"link must be 'scale-up' or 'scale-out', got {self.link!r}")
        if self.link_bw is not None and not (math.isfinite(self.link_bw) and self.link_bw > 0):
            raise UserInputError(f"link bandwidth must be > 0, got {self.link_bw!r}")
        check_ep(self.expert_imbalance, self.redundant_experts)


@dataclass(frozen=True)
class RooflineDerivation:
    """The coefficients and every intermediate quantity, for reports and docs."""

    costs: StageCosts
    terms: dict[str, float]
    """Named intermediate values (bytes, FLOPs, per-term ms) in the order they are derived."""
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"terms": dict(self.terms), "notes": list(self.notes)}


def roofline_costs(
    model: ModelSpec, attention_hw: Hardware, ffn_hw: Hardware, setup: RooflineSetup
) -> RooflineDerivation:
    """Per-layer coefficients (ms) of `model` with attention on `attention_hw` and the FFN on
    `ffn_hw`, each instance spanning the device counts in `setup`."""
    eff = setup.efficiency
    L = model.num_layers
    B = setup.batch
    w_bytes = model.weight_bytes
    kv_bytes = DTYPE_BYTES[setup.kv_dtype]
    act_bytes = DTYPE_BYTES[setup.activation_dtype]
    gA, gF = setup.attention_devices, setup.ffn_devices
    notes: list[str] = []

    fA = gA * attention_hw.flops(model.weight_dtype) * eff.flops
    mA = gA * attention_hw.memory_bw * eff.memory_bw
    fF = gF * ffn_hw.flops(model.weight_dtype) * eff.flops
    mF = gF * ffn_hw.memory_bw * eff.memory_bw
    for hw in {attention_hw.name: attention_hw, ffn_hw.name: ffn_hw}.values():
        if model.weight_dtype == "fp8" and hw.fp8_flops is None:
            notes.append(f"{hw.name} has no FP8 tensor path: FP8 weights computed at BF16 rate")

    # attention side
    kv_tok = model.kv_elems_per_token * kv_bytes
    alpha_a_mem = kv_tok / mA * MS
    alpha_a_cmp = model.attention_flops_per_context_token / fA * MS
    proj_mem = model.attention_params * w_bytes / mA * MS
    proj_cmp = 2 * model.attention_params * B / fA * MS
    head_mem = model.lm_head_params * w_bytes / mA * MS
    head_cmp = 2 * model.lm_head_params * B / fA * MS
    alpha_a = max(alpha_a_mem, alpha_a_cmp)
    beta_a = max(proj_mem, proj_cmp) + max(head_mem, head_cmp) / L

    # FFN side
    slots = _slot_factor(model, setup)
    alpha_f = (
        2 * model.ffn_params_active / fF * MS * (setup.expert_imbalance if model.is_moe else 1)
    )
    beta_f = model.ffn_params_total * slots * w_bytes / mF * MS
    if model.is_moe:
        touched = 1 - (1 - model.experts_per_token / model.num_experts) ** B
        notes.append(
            f"beta_F streams every expert; at r*B >= {B} tokens a layer touches "
            f">= {touched:.1%} of its experts (uniform routing)"
        )

    # communication
    fanout = expected_fanout(model.num_experts, model.experts_per_token, gF) if model.is_moe else 1
    bytes_tok = model.hidden_size * act_bytes * fanout
    side_hw, side_g = (attention_hw, gA) if setup.comm_scales_with == "B" else (ffn_hw, gF)
    per_dev = setup.link_bw if setup.link_bw is not None else side_hw.link_bw(setup.link)
    if per_dev is None:
        raise UserInputError(
            f"hardware {side_hw.name} has no {setup.link} bandwidth in the catalog; "
            "give one with --link-gbps"
        )
    link = side_g * per_dev * eff.link
    alpha_c = bytes_tok / link * MS
    beta_c = eff.link_latency_ms

    costs = StageCosts(
        attention=Affine(alpha_a, beta_a),
        ffn=Affine(alpha_f, beta_f),
        comm=Affine(alpha_c, beta_c),
        comm_scales_with=setup.comm_scales_with,
        num_layers=L,
        source="roofline",
        model=model.name,
        device=f"attention {gA}x{attention_hw.name}, ffn {gF}x{ffn_hw.name}",
    )
    terms = {
        "attention_flops_per_s": fA,
        "attention_memory_bw": mA,
        "ffn_flops_per_s": fF,
        "ffn_memory_bw": mF,
        "kv_bytes_per_context_token": kv_tok,
        "alpha_a_memory_ms": alpha_a_mem,
        "alpha_a_compute_ms": alpha_a_cmp,
        "attention_weight_bytes": model.attention_params * w_bytes,
        "attention_proj_memory_ms": proj_mem,
        "attention_proj_compute_ms": proj_cmp,
        "lm_head_memory_ms_per_step": head_mem,
        "lm_head_compute_ms_per_step": head_cmp,
        "ffn_active_flops_per_token": 2 * model.ffn_params_active,
        "ffn_weight_bytes": model.ffn_params_total * w_bytes,
        "comm_bytes_per_token": bytes_tok,
        "comm_fanout": float(fanout),
        "expert_imbalance": setup.expert_imbalance if model.is_moe else 1.0,
        "expert_slot_factor": slots,
        "link_bytes_per_s": link,
    }
    return RooflineDerivation(costs=costs, terms=terms, notes=tuple(notes))


# ---- memory -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryModel:
    """Bytes each side must hold, against what it has (all in bytes)."""

    attention_fixed_bytes: float
    """Attention-side weights: every layer's attention, embeddings, LM head."""
    kv_bytes_per_context_token: float
    """KV cache per resident context token, all layers."""
    attention_capacity_bytes: float
    ffn_fixed_bytes: float
    """FFN-side weights: every layer's FFN (all experts)."""
    ffn_bytes_per_token: float
    """FFN working activations per token of the aggregated batch (double-buffered)."""
    ffn_capacity_bytes: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _slot_factor(model: ModelSpec, setup: RooflineSetup) -> float:
    """(E + R) / E: the FFN weights held with R redundant expert slots (1 for dense models),
    at most m (a device holds one replica of an expert at most: with m devices only E * m
    slots can be filled, e.g. none is redundant on one device)."""
    if not model.is_moe or not setup.redundant_experts:
        return 1.0
    e = model.num_experts
    return min(e + setup.redundant_experts, e * setup.ffn_devices) / e


def memory_model(
    model: ModelSpec, attention_hw: Hardware, ffn_hw: Hardware, setup: RooflineSetup
) -> MemoryModel:
    w = model.weight_bytes
    act = DTYPE_BYTES[setup.activation_dtype]
    usable = setup.efficiency.usable_memory
    return MemoryModel(
        attention_fixed_bytes=(
            model.num_layers * model.attention_params
            + model.lm_head_params
            + model.embedding_params
        )
        * w,
        kv_bytes_per_context_token=model.num_layers
        * model.kv_elems_per_token
        * DTYPE_BYTES[setup.kv_dtype],
        attention_capacity_bytes=setup.attention_devices * attention_hw.memory_bytes * usable,
        ffn_fixed_bytes=model.num_layers * model.ffn_params_total * _slot_factor(model, setup) * w,
        ffn_bytes_per_token=2 * model.ffn_activation_elems_per_token * act,
        ffn_capacity_bytes=setup.ffn_devices * ffn_hw.memory_bytes * usable,
    )


def smallest_device_count(need_bytes: float, device_bytes: float, usable: float) -> int | None:
    """The smallest count in DEVICE_COUNTS whose usable memory holds `need_bytes`, else None."""
    for g in DEVICE_COUNTS:
        if need_bytes <= g * device_bytes * usable:
            return g
    return None


# ---- unit costs -------------------------------------------------------------------------------


def unit_costs(
    price_per_hour: float, flops_per_s: float, bytes_per_s: float
) -> tuple[float, float]:
    """Step-3's unit costs: $ per FLOP and $ per byte moved at full speed for one device-hour's
    price (arXiv 2507.19427): U_FLOP = price / (3600 * FLOP/s), U_byte = price / (3600 * B/s)."""
    if not (price_per_hour > 0 and flops_per_s > 0 and bytes_per_s > 0):
        raise UserInputError("unit costs need a positive price, FLOP/s and bandwidth")
    return price_per_hour / (3600 * flops_per_s), price_per_hour / (3600 * bytes_per_s)
