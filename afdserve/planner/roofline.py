"""Roofline stage coefficients from a model spec and hardware specs (see docs/planner.md).

Per layer, for an instance of g devices acting as one (ideal tensor/expert parallelism, so peak
FLOP/s, memory bandwidth and NIC bandwidth add up), with F = g * peak FLOP/s * eff_flops,
M = g * memory bandwidth * eff_memory_bw, N = g * link bandwidth * eff_link:

    alpha_A = max(kv_bytes_per_token / M, attn_flops_per_token / F)       per context token
    beta_A  = max(W_attn / M, 2 * P_attn * B / F) + max(W_head / M, 2 * P_head * B / F) / L
    alpha_F = 2 * (P_ffn_active + (I - 1) * P_routed_active) / F          per token
    beta_F  = (W_ffn_total + W_redundant) / M                             (every slot streamed)
    t_F(n)  = max(alpha_F * n, beta_F) + K_F * gemm_latency      dense FFN (a roofline, "max")
    t_F(n)  = alpha_F * n + beta_F + K_F * gemm_latency          MoE FFN ("sum"; F at moe_flops)
    alpha_C = hidden * act_bytes * fanout / N                             per token, one way
    beta_C  = link latency
    t_C     = max(alpha_C(gA) * B, alpha_C(gF) * r * B) + beta_C   (`comm_scales_with="both"`:
              B tokens over an attention instance's gA links, r * B over the FFN's gF)

MoE over gF FFN devices (expert parallelism, afdserve.planner.expert_parallel): `fanout` is the
expected number of distinct FFN devices a token's top-k experts reach (1 for dense models);
I = `expert_imbalance` (max/mean routed load over the FFN devices) scales the routed experts'
compute, P_routed_active = P_routed * k / E; W_redundant = R / E * W_routed are the weights of the
R redundant expert slots.

Each term is one kernel's own roofline (the larger of its memory time and its compute time); the
terms add because the kernels run one after another. A dense FFN is a roofline too: its GEMMs
overlap streaming the weights with the math, so a microbatch of n tokens takes
max(alpha_F * n, beta_F) (`Affine(combine="max")`; DeepGEMM's published table, see
`Efficiency.gemm_latency_ms`). An MoE FFN layer is more than its grouped GEMMs: routing,
permutation, quantisation, activation and finalize grow with the tokens, and measured MoE layers
grow linearly from the weight floor up, not from where compute overtakes it (aiconfigurator's
GB200 tables at EP 4: about 40 ns a token a layer; FastAFD's measured 16K steps: about 70 ns,
its A->F->A transfers included); so the MoE FFN is the sum of its weight streaming and a
per-token cost at `Efficiency.moe_flops` of peak
(`Efficiency.ffn_combine_for`, derived in benchmarks/derive_moe_efficiency.py). A measured
profile (`afdserve profile`) fits an affine line (combine="sum") and replaces all of this. The
efficiency factors are assumptions from the sources their docstrings give, not measurements of
the deployment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from afdserve.errors import UserInputError
from afdserve.planner.costs import COMBINES, Affine, StageCosts, check_comm_scaling
from afdserve.planner.expert_parallel import check_ep, check_redundant_slots, expected_fanout
from afdserve.planner.hardware_catalog import Hardware
from afdserve.planner.model_catalog import DTYPE_BYTES, ModelSpec

MS = 1e3  # seconds -> milliseconds
DEVICE_COUNTS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak that kernels reach, and other assumptions of the roofline (documented
    defaults; override them, or better, measure a profile)."""

    flops: float = 0.6
    """Fraction of peak tensor FLOP/s reached by decode-sized GEMMs: FlashMLA's compute-bound
    580 TFLOPS of the H800's 989 dense BF16 (FlashMLA README, first release), i.e. 0.59."""
    memory_bw: float = 0.9
    """Fraction of peak memory bandwidth reached when streaming weights and KV: DeepSeek's
    FlashMLA decode kernel reports up to 3000 GB/s memory-bound on an H800 SXM5 (3.35 TB/s
    peak), i.e. 0.9 (github.com/deepseek-ai/FlashMLA README). Chosen once for every case."""
    link: float = 0.8
    """Fraction of link bandwidth reached by activation transfers (assumed)."""
    link_latency_ms: float = 0.01
    """Fixed cost of one transfer per layer, ms (assumed: a few microseconds of RDMA latency
    plus software overhead)."""
    usable_memory: float = 0.9
    """Fraction of device memory available to weights, KV and activations (assumed)."""
    gemm_latency_ms: float = 0.004
    """Fixed time of one GEMM kernel beyond its roofline (launch, pipeline fill and drain), ms:
    DeepGEMM's published H800 FP8 GEMMs (README, first release: 28 normal, contiguous and
    masked grouped shapes) take a median 3.9 us longer than max(memory, compute) at the
    efficiencies above over the 16 shapes of M <= 1024 rows (decode sizes). The roofline FFN adds
    it per GEMM kernel of a layer, per microbatch (`ffn_gemm_kernels`); with it,
    max(memory, compute) + 4 us is within a median 9.6% of all 28 shapes, against 18.4% without
    it and 18.5% for the sum of memory and compute time."""
    moe_flops: float | None = 0.43
    """Fraction of peak FLOP/s each extra token of an MoE FFN layer costs, on top of streaming
    its expert weights (None: `flops`). From aiconfigurator 0.12.0's measured MoE kernel tables
    (`benchmarks/derive_moe_efficiency.py`): the fused MoE layer's latency slope over 4K-16K
    tokens against its FLOPs, for the expert shape all its devices hold (Qwen3-235B's, FP8), the
    fastest kernel collected per device and EP size; the median over H100, H200, B200 and GB200
    at EP 4, 8 and 16 is 0.432 (cells 0.30-0.51; every kernel's median, 0.20, is the untuned
    end). Routing, permutation, quantisation, activation and finalize grow with tokens as the
    grouped GEMMs do, which is why the per-token cost is well below the dense GEMMs' `flops`."""
    ffn_combine: str | None = None
    """How the roofline FFN combines its per-token compute and its weight streaming: 'max' (one
    GEMM overlaps them, DeepGEMM's table above), 'sum' (one after the other), or None (the
    default): 'sum' for an MoE FFN, whose token-proportional kernels (above) run beside the
    grouped GEMMs that stream the experts, and 'max' for a dense one (`ffn_combine_for`)."""

    def ffn_flops_for(self, is_moe: bool) -> float:
        """The fraction of peak FLOP/s the roofline FFN's per-token term runs at for a model."""
        return self.moe_flops if is_moe and self.moe_flops is not None else self.flops

    def ffn_combine_for(self, is_moe: bool) -> str:
        """The FFN roofline's combine for a model: the explicit one, else sum (MoE) / max."""
        if self.ffn_combine is not None:
            return self.ffn_combine
        return "sum" if is_moe else "max"

    def __post_init__(self) -> None:
        for name in ("flops", "memory_bw", "link", "usable_memory", "moe_flops"):
            v = getattr(self, name)
            if name == "moe_flops" and v is None:
                continue
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise UserInputError(f"efficiency {name} must be in (0, 1], got {v!r}")
        if self.ffn_combine is not None and self.ffn_combine not in COMBINES:
            raise UserInputError(
                f"ffn_combine must be one of {', '.join(COMBINES)}, got {self.ffn_combine!r}"
            )
        if not (math.isfinite(self.link_latency_ms) and self.link_latency_ms >= 0):
            raise UserInputError(f"link latency must be >= 0 ms, got {self.link_latency_ms!r}")
        g = self.gemm_latency_ms
        if (
            isinstance(g, bool)
            or not isinstance(g, (int, float))
            or not (math.isfinite(g) and g >= 0)
        ):
            raise UserInputError(f"GEMM latency must be >= 0 ms, got {g!r}")


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
    """Which side's links the transfer is charged on: 'B' (each attention instance's gA
    devices), 'rB' (the FFN's gF devices) or 'both' (each priced, the busier sets the pace:
    what `afdserve plan` uses, since which side is busier depends on r; see `busiest_side`)."""
    efficiency: Efficiency = field(default_factory=Efficiency)
    expert_imbalance: float = 1.0
    """MoE only: max/mean routed (token, expert) load over the FFN devices (1 = balanced); the
    runtime's `afdserve:ffn_expert_imbalance`, averaged over MoE layers. See `roofline_costs`."""
    redundant_experts: int = 0
    """MoE only: R extra expert slots per MoE layer (EPLB replicas); each FFN device holds
    (E + R) / m experts' weights."""

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
        check_comm_scaling(self.comm_scales_with)
        check_ep(self.expert_imbalance, self.redundant_experts)


def busiest_side(ratio: int, attention_devices: int, ffn_devices: int) -> str:
    """Which link the communication term is charged on (`comm_scales_with`): 'rB' when the FFN
    instance's devices receive more tokens each (r * B over gF) than an attention instance's
    devices send (B over gA), else 'B'. A token's dispatch fans out to the same number of FFN
    devices either way, so the per-device token count decides which side's links are busier."""
    return "rB" if ratio * attention_devices > ffn_devices else "B"


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
    `ffn_hw`, each instance spanning the device counts in `setup`.

    Expert parallelism (MoE, gF = `setup.ffn_devices`): the busiest FFN device sets a layer's
    pace, and its share of the routed (token, expert) pairs is I = `setup.expert_imbalance`
    times the mean, so the routed experts' compute per token is I times its balanced value:
    alpha_F gains (I - 1) * 2 * P_routed_active / F. Only that term: dense layers, shared
    experts and the router are split evenly by rows, and each device streams only the weights
    it holds whatever its load, so beta_F does not depend on I. I is capped at gF (max/mean over
    gF devices cannot exceed gF; one device is balanced by definition), with a note. The
    R = `setup.redundant_experts` extra slots add R/E of the routed weights to what the devices
    stream (beta_F) and hold (`memory_model`); E + R must not exceed E * gF.
    """
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
    fF = gF * ffn_hw.flops(model.weight_dtype) * eff.ffn_flops_for(model.is_moe)
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
    imbalance = _ep_imbalance(model, setup, notes)
    routed_active = _routed_active_params(model)
    alpha_f_skew = (imbalance - 1.0) * 2 * routed_active / fF * MS
    alpha_f = 2 * model.ffn_params_active / fF * MS + alpha_f_skew
    ffn_weight_bytes = _ffn_params_held(model, setup) * w_bytes
    beta_f = ffn_weight_bytes / mF * MS
    ffn_kernels = ffn_gemm_kernels(model)
    fixed_f = ffn_kernels * eff.gemm_latency_ms
    if model.is_moe:
        touched = 1 - (1 - model.experts_per_token / model.num_experts) ** B
        notes.append(
            f"beta_F streams every expert; at r*B >= {B} tokens a layer touches "
            f">= {touched:.1%} of its experts (uniform routing)"
        )

    # communication
    fanout = (
        expected_fanout(model.num_experts, model.experts_per_token, gF) if model.is_moe else 1.0
    )
    if model.is_moe and gF > 1:
        notes.append(
            f"dispatch fan-out: a token reaches {fanout:.3g} of {gF} FFN devices on average "
            f"(top-{model.experts_per_token} of {model.num_experts} experts, uniform routing, "
            "static placement)"
        )
    bytes_tok = model.hidden_size * act_bytes * fanout

    def alpha_c_on(hw: Hardware, devices: int) -> tuple[float, float]:
        """(ms per token one way, link bytes/s) over one side's `devices` links."""
        per_dev = setup.link_bw if setup.link_bw is not None else hw.link_bw(setup.link)
        if per_dev is None:
            raise UserInputError(
                f"hardware {hw.name} has no {setup.link} bandwidth in the catalog; "
                "give one with --link-gbps"
            )
        bw = devices * per_dev * eff.link
        return bytes_tok / bw * MS, bw

    beta_c = eff.link_latency_ms
    scales = setup.comm_scales_with
    alpha_c, link = alpha_c_on(*((attention_hw, gA) if scales != "rB" else (ffn_hw, gF)))
    comm_ffn = None
    if scales == "both":
        alpha_cf, link_ffn = alpha_c_on(ffn_hw, gF)
        comm_ffn = Affine(alpha_cf, beta_c)
    costs = StageCosts(
        attention=Affine(alpha_a, beta_a),
        ffn=Affine(alpha_f, beta_f, combine=eff.ffn_combine_for(model.is_moe), fixed=fixed_f),
        comm=Affine(alpha_c, beta_c),
        comm_scales_with=scales,
        comm_ffn=comm_ffn,
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
        "ffn_weight_bytes": ffn_weight_bytes,
        "ffn_routed_active_flops_per_token": 2 * routed_active,
        "expert_imbalance": imbalance,
        "alpha_f_imbalance_ms": alpha_f_skew,
        "ffn_gemm_kernels": float(ffn_kernels),
        "ffn_fixed_ms": fixed_f,
        "redundant_experts": float(setup.redundant_experts),
        "expert_slot_factor": (
            (model.num_experts + setup.redundant_experts) / model.num_experts
            if model.is_moe
            else 1.0
        ),
        "comm_bytes_per_token": bytes_tok,
        "comm_fanout": float(fanout),
        "link_bytes_per_s": link,
    }
    if comm_ffn is not None:
        terms["ffn_link_bytes_per_s"] = link_ffn
    return RooflineDerivation(costs=costs, terms=terms, notes=tuple(notes))


def ffn_gemm_kernels(model: ModelSpec) -> int:
    """GEMM kernels of one FFN layer and microbatch: gate/up and down of the (routed) MLP, plus
    the router and a shared expert's gate/up and down for MoE. Averaged layers count as MoE."""
    if not model.is_moe:
        return 2
    router = model.hidden_size * model.num_experts
    shared = model.ffn_params_total - model.ffn_params_routed - router
    return 3 + (2 if shared > 0.01 * model.ffn_params_total else 0)


def _ep_imbalance(model: ModelSpec, setup: RooflineSetup, notes: list[str]) -> float:
    """The imbalance factor the FFN time uses (checks the EP inputs against the model)."""
    gF, given, R = setup.ffn_devices, setup.expert_imbalance, setup.redundant_experts
    if not model.is_moe:
        if given != 1.0 or R:
            raise UserInputError(
                f"expert imbalance and redundant experts apply to MoE models; {model.name} is dense"
            )
        return 1.0
    check_redundant_slots(model.num_experts, gF, R)
    if given > gF:
        notes.append(
            f"expert imbalance {given:g} capped at {gF}: max/mean load over {gF} FFN "
            f"device(s) cannot exceed {gF}"
        )
        return float(gF)
    return given


def _routed_active_params(model: ModelSpec) -> float:
    """Routed-expert parameters one token touches per layer: P_routed * k / E."""
    if not model.is_moe:
        return 0.0
    return model.ffn_params_routed * model.experts_per_token / model.num_experts


def _ffn_params_held(model: ModelSpec, setup: RooflineSetup) -> float:
    """FFN parameters per layer over the FFN devices: all of them plus the R redundant slots."""
    extra = 0.0
    if model.is_moe and setup.redundant_experts:
        extra = model.ffn_params_routed * setup.redundant_experts / model.num_experts
    return model.ffn_params_total + extra


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
    """FFN-side weights: every layer's FFN (all experts, plus the redundant expert slots)."""
    ffn_bytes_per_token: float
    """FFN working activations per token of the aggregated batch (double-buffered)."""
    ffn_capacity_bytes: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


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
        ffn_fixed_bytes=model.num_layers * _ffn_params_held(model, setup) * w,
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
