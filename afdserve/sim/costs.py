"""What the simulator charges for each piece of work: the planner's per-layer decode coefficients
plus the few things a step-level simulation needs that the closed form leaves out.

The planner's `StageCosts` (ms, per layer) price decode: attention by the context tokens it reads,
the FFN by the tokens of its aggregated batch, communication by the tokens on a link. A simulator
of real serving also has to price

- prefill chunks on the attention side: per new token (projections) and per (query, context)
  pair (the attention itself, quadratic in the chunk), `prefill_token_ms` / `prefill_pair_ms`;
  the FFN and the links charge prefill tokens like any other token;
- the per-step work outside the layers on each attention worker (scheduling, embedding, the LM
  head, sampling): `step_alpha_ms` per sequence that samples a token, `step_prefill_token_ms`
  per prefill token, plus `step_beta_ms`;
- the KV transfer from a prefill to a decode instance (prefill/decode-split baseline):
  `kv_transfer_ms_per_token` per prompt token plus `kv_transfer_beta_ms`.

All default to 0, so explicit planner coefficients simulate exactly the planner's model. A
measured profile (`afdserve profile`) stores them as extra top-level keys (`prefill`, `step`,
`kv_transfer`) that the planner keeps and ignores; a roofline derives them from the same model
and hardware catalogs the planner uses.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from afdserve.errors import UserInputError
from afdserve.planner.costs import StageCosts

MS = 1e3


@dataclass(frozen=True)
class SimCosts:
    """Per-layer stage costs (the planner's) plus prefill, per-step and KV-transfer costs (ms)."""

    stages: StageCosts
    """Decode coefficients per layer: attention (per context token), FFN, communication."""
    prefill_token_ms: float = 0.0
    """Attention-side ms per prefill token per layer (projections of a chunk's new tokens)."""
    prefill_pair_ms: float = 0.0
    """Attention-side ms per (query token, context token) pair per layer of a prefill chunk."""
    step_alpha_ms: float = 0.0
    """Per step and attention worker: ms per sequence that samples (LM head, sampler)."""
    step_beta_ms: float = 0.0
    """Per step and attention worker with work: fixed ms (scheduling, metadata, embedding)."""
    step_prefill_token_ms: float = 0.0
    """Per step and attention worker: ms per prefill token of its step's bookkeeping outside the
    layers (attention metadata, embedding), beyond what the per-sequence term covers."""
    afd_step_ms: float = 0.0
    """Per step of an AFD bundle: extra fixed ms of its step machinery (dispatching the workers,
    the SYNC message), on each attention worker's critical path."""
    afd_microbatch_ms: float = 0.0
    """Per step of an AFD bundle and attention worker: extra ms per microbatch beyond the first
    (a worker-process runtime pays per-layer round trips, each with its wake-ups, per
    microbatch), on the worker's critical path, outside the overlapped stages."""
    kv_transfer_ms_per_token: float = 0.0
    """Prefill/decode split: ms to move one prompt token's KV (all layers) to a decode instance."""
    kv_transfer_beta_ms: float = 0.0
    """Prefill/decode split: fixed ms per KV transfer."""
    colocated_a2a_ms_per_token: float = 0.0
    """Colocated (aggregated) instance spanning g > 1 devices with expert parallelism: ms per
    token per layer of its own dispatch + combine all-to-all (each token's hidden state to the
    expected distinct devices of its top-k experts and back, over g devices' links). An AFD
    bundle pays this as its A<->F transfer; a colocated replica pays it inside, which is what
    keeps wide-EP baselines honest."""
    colocated_a2a_beta_ms: float = 0.0
    """Colocated instance: fixed ms per layer and microbatch of the all-to-all (two latencies)."""

    def __post_init__(self) -> None:
        if not isinstance(self.stages, StageCosts):
            raise UserInputError(f"stages must be a StageCosts, got {self.stages!r}")
        if self.stages.comm_scales_with == "both":
            raise UserInputError(
                "the simulator times one bundle of a fixed ratio on one link: give costs with "
                "comm_scales_with 'B' or 'rB' (StageCosts.at_ratio(r) picks the busier one)"
            )
        for f in dataclasses.fields(self):
            if f.name == "stages":
                continue
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserInputError(f"{f.name} must be a finite number, got {v!r}")
            if v < 0:
                raise UserInputError(f"{f.name} must be >= 0, got {v!r}")

    @property
    def num_layers(self) -> int:
        return self.stages.num_layers

    @classmethod
    def explicit(
        cls,
        alpha_a: float,
        beta_a: float,
        alpha_f: float,
        beta_f: float,
        alpha_c: float = 0.0,
        beta_c: float = 0.0,
        *,
        comm_scales_with: str = "B",
        num_layers: int = 1,
        **extras: float,
    ) -> SimCosts:
        """Explicit per-layer coefficients (ms), as `StageCosts.explicit`, plus any extras."""
        stages = StageCosts.explicit(
            alpha_a,
            beta_a,
            alpha_f,
            beta_f,
            alpha_c,
            beta_c,
            comm_scales_with=comm_scales_with,
            num_layers=num_layers,
        )
        return cls(stages, **extras)

    # ---- profile JSON -----------------------------------------------------------------------

    @classmethod
    def from_profile(cls, path: str | os.PathLike[str], ratio: int | None = None) -> SimCosts:
        """Read a profile JSON (the planner's schema plus the optional simulator keys). A
        profile pricing both links (`comm_scales_with="both"`, as `afdserve plan --json` writes
        its roofline coefficients) needs the bundle's `ratio` to pick the busier one."""
        stages = StageCosts.from_profile(path)
        if ratio is not None:
            stages = stages.at_ratio(ratio)
        return cls._with_extras(stages, stages.extra, str(path))

    @classmethod
    def from_profile_dict(cls, data: Any, origin: str = "profile") -> SimCosts:
        stages = StageCosts.from_profile_dict(data, origin=origin)
        return cls._with_extras(stages, stages.extra, origin)

    @classmethod
    def _with_extras(cls, stages: StageCosts, extra: dict[str, Any], origin: str) -> SimCosts:
        kw: dict[str, float] = {}
        for key, fields in (
            ("prefill", (("token_ms", "prefill_token_ms"), ("pair_ms", "prefill_pair_ms"))),
            (
                "step",
                (
                    ("alpha", "step_alpha_ms"),
                    ("beta", "step_beta_ms"),
                    ("afd_beta", "afd_step_ms"),
                    ("prefill_token_ms", "step_prefill_token_ms"),
                    ("afd_microbatch_ms", "afd_microbatch_ms"),
                ),
            ),
            (
                "kv_transfer",
                (("alpha", "kv_transfer_ms_per_token"), ("beta", "kv_transfer_beta_ms")),
            ),
        ):
            entry = extra.get(key)
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise UserInputError(f"{origin}: {key!r} must be a JSON object")
            for src, dst in fields:
                if src in entry:
                    kw[dst] = entry[src]
        try:
            return cls(stages, **kw)
        except UserInputError as exc:
            raise UserInputError(f"{origin}: {exc}") from None

    def to_profile_dict(self) -> dict[str, Any]:
        """The planner's profile object with the simulator's keys added (round-trips)."""
        d = self.stages.to_profile_dict()
        prefill = dict(d.get("prefill") or {})
        prefill.update(token_ms=self.prefill_token_ms, pair_ms=self.prefill_pair_ms)
        step = dict(d.get("step") or {})
        step.update(
            alpha=self.step_alpha_ms,
            beta=self.step_beta_ms,
            afd_beta=self.afd_step_ms,
            prefill_token_ms=self.step_prefill_token_ms,
            afd_microbatch_ms=self.afd_microbatch_ms,
        )
        kv = dict(d.get("kv_transfer") or {})
        kv.update(alpha=self.kv_transfer_ms_per_token, beta=self.kv_transfer_beta_ms)
        d.update(prefill=prefill, step=step, kv_transfer=kv)
        return d

    def describe(self) -> dict[str, float]:
        """Flat numbers for reports."""
        s = self.stages
        return {
            "alpha_a": s.attention.alpha,
            "beta_a": s.attention.beta,
            "alpha_f": s.ffn.alpha,
            "beta_f": s.ffn.beta,
            "alpha_c": s.comm.alpha,
            "beta_c": s.comm.beta,
            "num_layers": s.num_layers,
            "prefill_token_ms": self.prefill_token_ms,
            "prefill_pair_ms": self.prefill_pair_ms,
            "step_alpha_ms": self.step_alpha_ms,
            "step_beta_ms": self.step_beta_ms,
            "afd_step_ms": self.afd_step_ms,
            "afd_microbatch_ms": self.afd_microbatch_ms,
            "step_prefill_token_ms": self.step_prefill_token_ms,
            "kv_transfer_ms_per_token": self.kv_transfer_ms_per_token,
            "colocated_a2a_ms_per_token": self.colocated_a2a_ms_per_token,
        }


def roofline_sim_costs(model: Any, attention_hw: Any, ffn_hw: Any, setup: Any) -> SimCosts:
    """The planner's roofline coefficients plus prefill and KV-transfer costs from the same specs.

    Prefill on the attention side is compute bound: 2 * P_attn FLOPs per new token for the
    projections and `attention_flops_per_context_token` per (query, context) pair, at the
    attention instance's effective FLOP/s. The KV of one prompt token (all layers) moves over the
    same link the activations use. (`model`: planner ModelSpec, `*_hw`: Hardware, `setup`:
    RooflineSetup; typed loosely to keep the import light.)
    """
    from afdserve.planner.roofline import roofline_costs

    der = roofline_costs(model, attention_hw, ffn_hw, setup)
    t = der.terms
    flops = t["attention_flops_per_s"]
    a2a_alpha, a2a_beta = colocated_a2a(model, ffn_hw, setup)
    return SimCosts(
        der.costs,
        prefill_token_ms=2.0 * model.attention_params / flops * MS,
        prefill_pair_ms=model.attention_flops_per_context_token / flops * MS,
        kv_transfer_ms_per_token=kv_handoff_ms_per_token(model, attention_hw, setup, setup.link),
        kv_transfer_beta_ms=der.costs.comm.beta,
        colocated_a2a_ms_per_token=a2a_alpha,
        colocated_a2a_beta_ms=a2a_beta,
    )


def kv_handoff_ms_per_token(model: Any, hw: Any, setup: Any, link: str) -> float:
    """ms to move one prompt token's KV (every layer, `setup.kv_dtype`) into an attention
    instance over its own `setup.attention_devices` devices' `link` (or `setup.link_bw`, the
    roofline's override of any link) at the link efficiency: the KV lands on the attention side,
    whichever side's links carry the A<->F traffic."""
    from afdserve.planner.model_catalog import DTYPE_BYTES

    per_dev = setup.link_bw or hw.link_bw(link) or hw.link_bw("scale-out")
    if per_dev is None:
        raise UserInputError(f"hardware {hw.name} has no {link} bandwidth in the catalog")
    kv_bytes = model.num_layers * model.kv_elems_per_token * DTYPE_BYTES[setup.kv_dtype]
    return kv_bytes / (setup.attention_devices * per_dev * setup.efficiency.link) * MS


def colocated_a2a(model: Any, hw: Any, setup: Any) -> tuple[float, float]:
    """(ms per token, fixed ms) per layer of the dispatch + combine all-to-all inside one
    expert-parallel instance of g = `setup.ffn_devices` devices, (0, 0) for a dense model or one
    device. A token's hidden state goes to the expected distinct devices of its top-k experts,
    (g - 1) / g of them remote, and comes back: 2 * hidden * act_bytes * fanout * (g - 1) / g
    bytes, spread over the g devices' links (scale-up when g fits the hardware's scale-up
    domain, else the NICs) at the link efficiency; two link latencies."""
    from afdserve.planner.expert_parallel import expected_fanout
    from afdserve.planner.model_catalog import DTYPE_BYTES

    g = setup.ffn_devices
    if not model.is_moe or g <= 1:
        return 0.0, 0.0
    fanout = expected_fanout(model.num_experts, model.experts_per_token, g)
    per_dev = hw.link_bw(hw.link_for(g)) or hw.link_bw("scale-out")
    if per_dev is None:
        return 0.0, 0.0
    eff = setup.efficiency
    bytes_tok = 2 * model.hidden_size * DTYPE_BYTES[setup.activation_dtype] * fanout * (g - 1) / g
    return bytes_tok / (g * per_dev * eff.link) * MS, 2 * eff.link_latency_ms
