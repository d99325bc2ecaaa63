"""Design-space search: the best AFD, aggregated and prefill/decode-split deployment of a model on
N devices for a workload under TTFT and TPOT SLOs.

Candidates (each instance spans the fewest power-of-two devices whose memory holds its weights
plus the KV of its slots at the workload's theta, or twice that):

- AFD: bundles of r attention instances and one FFN instance (r = 1..16), M microbatches,
  B slots per attention worker; as many bundles as fit in N devices;
- aggregated: N / g replicas of B slots each;
- prefill/decode split: Np prefill and Nd decode instances (every split that fits), B decode slots.

Two stages. (1) Every candidate is simulated in closed loop (saturated, decode only, the bulk
path; prefill pools by their prefill token rate), which ranks candidates by saturated throughput
per device and drops those whose TPOT already misses the SLO at full batch. (2) The best few of
each family are simulated in full (open loop, the workload's arrivals rescaled to a rate, chunked
prefill, KV capacity from the memory model), and the highest rate at which at least
`attainment` of the requests meet both SLOs is found by bisection. A family's best is the
candidate with the most SLO-meeting output tokens per second per device at its highest such
rate ("goodput"); the report also gives tokens per second per user (1000 / mean TPOT).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from afdserve.errors import UserInputError
from afdserve.sim.config import BundleConfig
from afdserve.sim.costs import SimCosts, kv_handoff_ms_per_token, roofline_sim_costs
from afdserve.sim.deployments import run_afd, run_aggregated, run_pd_split, run_unit
from afdserve.sim.metrics import SLO, SimReport, summarize
from afdserve.sim.plots import latency_samples
from afdserve.sim.requests import RequestSet, closed_loop, from_trace

FAMILIES: tuple[str, ...] = ("afd", "afd+prefill", "aggregated", "pd-split")
"""AFD bundles doing their own chunked prefill; AFD decode bundles fed by a pool of colocated
prefill instances (the KV handed off at the link's cost: the family real deployments use);
colocated replicas (with their own expert all-to-all); a colocated prefill/decode split."""


@dataclass(frozen=True)
class SearchSpace:
    ratios: tuple[int, ...] = tuple(range(1, 17))
    microbatches: tuple[int, ...] = (1, 2, 4)
    batches: tuple[int, ...] = (32, 64, 128, 256)
    token_budget: int = 2048
    finalists: int = 2
    """Candidates per family simulated in full (stage 2)."""
    bisection_steps: int = 5
    attainment: float = 0.9
    closed_loop_steps: int = 600

    def __post_init__(self) -> None:
        for name in ("ratios", "microbatches", "batches"):
            v = getattr(self, name)
            if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise UserInputError(f"search {name} must be integers >= 1")
        if not 0 < self.attainment <= 1:
            raise UserInputError(f"attainment must be in (0, 1], got {self.attainment}")
        for name in ("token_budget", "finalists", "bisection_steps", "closed_loop_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserInputError(f"{name} must be an integer >= 1, got {v!r}")


@dataclass
class Candidate:
    family: str
    devices: int
    """Devices the deployment uses (<= N)."""
    params: dict[str, Any]
    costs: SimCosts
    decode_costs: SimCosts | None = None
    kv_capacity_tokens: int | None = None
    capacity_tok_s: float = 0.0
    """Stage 1: saturated output tokens/s of the whole deployment."""
    saturated_tpot_p90_ms: float = math.nan
    max_rate: float | None = None
    """Stage 2: highest request rate (req/s) meeting the SLOs, None if none does."""
    report: SimReport | None = None
    """Stage 2: the run at max_rate."""
    samples: dict[str, Any] | None = None
    """Stage 2: latency samples of that run (for CDF plots)."""

    def describe(self) -> str:
        p = self.params
        if self.family == "afd":
            return (
                f"{p['bundles']} x ({p['r']}A{p['ffn_devices']}F-dev, attention {p['attention_devices']} "
                f"dev) M={p['microbatches']} B={p['batch']}"
            )
        if self.family == "afd+prefill":
            return (
                f"{p['prefill_instances']} prefill ({p['prefill_devices']} dev) + "
                f"{p['bundles']} x ({p['r']}A{p['ffn_devices']}F-dev, attention "
                f"{p['attention_devices']} dev) M={p['microbatches']} B={p['batch']}"
            )
        if self.family == "aggregated":
            return f"{p['instances']} x aggregated ({p['instance_devices']} dev) B={p['batch']}"
        return (
            f"{p['prefill_instances']} prefill ({p['prefill_devices']} dev) + "
            f"{p['decode_instances']} decode ({p['decode_devices']} dev) B={p['batch']}"
        )

    def to_dict(self) -> dict[str, Any]:
        rep = self.report
        out: dict[str, Any] = {
            "family": self.family,
            "config": self.describe(),
            "params": dict(self.params),
            "devices": self.devices,
            "saturated_tok_s": self.capacity_tok_s,
            "saturated_tok_s_per_device": self.capacity_tok_s / self.devices,
            "max_rate_req_s": self.max_rate,
        }
        if rep is not None:
            out.update(
                goodput_tok_s=rep.goodput_tok_s,
                goodput_tok_s_per_device=(rep.goodput_tok_s or 0.0) / self.devices,
                throughput_tok_s=rep.throughput_tok_s,
                tokens_per_user_s=_num(rep.tokens_per_user_s),
                slo_attainment=rep.slo_attainment,
                ttft_ms=rep.ttft_ms.to_dict(),
                tpot_ms=rep.tpot_ms.to_dict(),
                itl_ms=rep.itl_ms.to_dict(),
                attention_idle=_num(rep.attention_idle),
                ffn_idle=None if rep.ffn_idle is None else _num(rep.ffn_idle),
            )
        return out


@dataclass
class SearchResult:
    model: str
    hardware: str
    devices: int
    workload: str
    slo: SLO
    space: SearchSpace
    best: dict[str, Candidate | None]
    finalists: list[Candidate] = field(default_factory=list)
    screened: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "hardware": self.hardware,
            "devices": self.devices,
            "workload": self.workload,
            "slo": {"ttft_ms": self.slo.ttft_ms, "tpot_ms": self.slo.tpot_ms},
            "attainment": self.space.attainment,
            "best": {k: (None if c is None else c.to_dict()) for k, c in self.best.items()},
            "finalists": [c.to_dict() for c in self.finalists],
            "screened": len(self.screened),
            "notes": list(self.notes),
        }


def _num(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


# ---- the search ------------------------------------------------------------------------------


def search(
    model: str,
    hardware: str,
    devices: int,
    workload: str,
    slo: SLO,
    *,
    space: SearchSpace = SearchSpace(),
    requests: int = 1000,
    seed: int = 0,
    progress: Callable[[str, int], Any] | None = None,
    expert_imbalance: float = 1.0,
    redundant_experts: int = 0,
    weight_dtype: str | None = None,
    prefix_hit_rate: str | float | None = None,
    kv_dtype: str = "bf16",
) -> SearchResult:
    """`expert_imbalance` and `redundant_experts` (MoE models): the roofline's expert-parallel
    inputs (`RooflineSetup`) for every instance that holds experts; instances whose devices
    cannot hold E + R expert slots are not candidates. `kv_dtype`: the KV cache's dtype in every
    instance (its bytes per token size the slots, the attention's reads and the KV hand-off)."""
    from afdserve.planner import load_hardware, load_model, load_trace, stats_from_trace
    from afdserve.planner.expert_parallel import check_expert_imbalance, check_redundant_experts

    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise UserInputError(
            f"--gpus must be an integer >= 1 (devices to deploy on), got {devices!r}"
        )
    if slo.ttft_ms is None and slo.tpot_ms is None:
        raise UserInputError("give at least one SLO (--ttft-slo-ms, --tpot-slo-ms)")
    spec = load_model(model, weight_dtype)
    hw = load_hardware(hardware)
    trace = load_trace(workload)
    stats = stats_from_trace(trace)
    cached = trace_cached(trace, prefix_hit_rate)
    reqs_all = from_trace(trace, limit=requests, arrivals="offline", cached=cached)
    tick = progress or (lambda _s, _n: None)
    notes: list[str] = []
    check_expert_imbalance(expert_imbalance)
    check_redundant_experts(redundant_experts)
    if not spec.is_moe and (expert_imbalance != 1.0 or redundant_experts):
        raise UserInputError(
            f"expert imbalance and redundant experts apply to MoE models; {spec.name} is dense"
        )
    if expert_imbalance != 1.0:
        notes.append(
            f"expert imbalance {expert_imbalance:g} (max/mean) in every MoE FFN, capped at its "
            "device count (one device is balanced)"
        )
    if redundant_experts:
        notes.append(
            f"{redundant_experts} redundant experts per MoE layer in every instance holding "
            "experts (weights held and streamed)"
        )
    if kv_dtype != "bf16":
        notes.append(f"KV cache {kv_dtype} in every instance")
    setup_kw = dict(
        expert_imbalance=expert_imbalance, redundant_experts=redundant_experts, kv_dtype=kv_dtype
    )
    cands = _candidates(spec, hw, devices, stats.theta, space, notes, setup_kw)
    if not cands:
        raise UserInputError(
            f"{spec.name} does not fit on {devices} x {hw.name} in any configuration "
            "(not even one instance holds its weights)"
        )
    # stage 1: saturated closed loop
    bundle_cache: dict[Any, SimReport] = {}
    for c in cands:
        _screen(c, reqs_all, trace, space, seed, bundle_cache)
        tick("screen", 1)
    viable = [
        c
        for c in cands
        if c.capacity_tok_s > 0
        and (slo.tpot_ms is None or not (c.saturated_tpot_p90_ms > slo.tpot_ms))
    ]
    # stage 2: open loop at the highest rate that meets the SLOs
    best: dict[str, Candidate | None] = {}
    finalists: list[Candidate] = []
    for fam in FAMILIES:
        pool = sorted(
            (c for c in viable if c.family == fam),
            key=lambda c: c.capacity_tok_s / c.devices,
            reverse=True,
        )[: space.finalists]
        for c in pool:
            _max_rate(c, trace, requests, slo, space, seed, tick, cached)
            finalists.append(c)
        ok = [c for c in pool if c.max_rate is not None and c.report is not None]
        best[fam] = (
            max(ok, key=lambda c: (c.report.goodput_tok_s or 0.0) / c.devices) if ok else None
        )
    if all(v is None for v in best.values()):
        closest = max(cands, key=lambda c: c.capacity_tok_s / c.devices)
        raise UserInputError(
            f"no configuration meets TTFT <= {slo.ttft_ms} ms and TPOT <= {slo.tpot_ms} ms for "
            f"{space.attainment:.0%} of requests at any load; the fastest at saturation "
            f"({closest.describe()}) has p90 TPOT {closest.saturated_tpot_p90_ms:.3g} ms"
        )
    return SearchResult(
        spec.name, hw.name, devices, trace.name, slo, space, best, finalists, cands, notes
    )


def _candidates(
    spec,
    hw,
    N: int,
    theta: float,
    space: SearchSpace,
    notes: list[str],
    setup_kw: dict[str, Any] | None = None,
) -> list[Candidate]:
    from afdserve.planner import RooflineSetup
    from afdserve.planner.expert_parallel import redundant_slots_fit
    from afdserve.planner.roofline import DEVICE_COUNTS, busiest_side, memory_model

    ep = setup_kw or {}  # RooflineSetup fields every instance shares (expert parallelism, KV dtype)
    mem = memory_model(spec, hw, hw, RooflineSetup(batch=1, **ep))
    usable = 0.9
    per_dev = hw.memory_bytes * usable
    kv_tok = mem.kv_bytes_per_context_token
    R = ep.get("redundant_experts", 0)

    def fit(fixed: float, kv_tokens: float, experts: bool = False) -> list[int]:
        gs = [
            g
            for g in DEVICE_COUNTS
            if g <= N
            and g * per_dev >= fixed + kv_tokens * kv_tok
            and not (experts and spec.is_moe and not redundant_slots_fit(spec.num_experts, g, R))
        ]
        return gs[:2]

    def kv_cap(g: int, fixed: float) -> int:
        return max(0, int((g * per_dev - fixed) / kv_tok))

    cands: list[Candidate] = []
    a_fixed, f_fixed = mem.attention_fixed_bytes, mem.ffn_fixed_bytes
    for B in space.batches:
        kv_need = B * theta
        ga_opts = fit(a_fixed, kv_need)
        afd_cfgs: list[tuple[int, int, int, int, SimCosts, int]] = []
        for gF in fit(f_fixed + space.ratios[-1] * B * mem.ffn_bytes_per_token, 0.0, True):
            for gA in ga_opts:
                # the communication term on the busier side's links (B or r*B per device), the
                # link itself from the bundle's size against the hardware's scale-up domain
                by_side: dict[tuple[str, str], SimCosts] = {}
                for r in space.ratios:
                    bundle = r * gA + gF
                    if bundle > N:
                        break
                    key = (busiest_side(r, gA, gF), hw.link_for(bundle))
                    if key not in by_side:
                        by_side[key] = roofline_sim_costs(
                            spec,
                            hw,
                            hw,
                            RooflineSetup(
                                batch=B,
                                attention_devices=gA,
                                ffn_devices=gF,
                                comm_scales_with=key[0],
                                link=key[1],
                                **ep,
                            ),
                        )
                    costs = by_side[key]
                    for M in space.microbatches:
                        if M > B:
                            continue
                        afd_cfgs.append((r, M, gA, gF, costs, kv_cap(gA, a_fixed)))
                        k = N // bundle
                        cands.append(
                            Candidate(
                                "afd",
                                k * bundle,
                                dict(
                                    bundles=k,
                                    r=r,
                                    microbatches=M,
                                    batch=B,
                                    attention_devices=gA,
                                    ffn_devices=gF,
                                ),
                                costs,
                                kv_capacity_tokens=kv_cap(gA, a_fixed),
                            )
                        )
        for i, g in enumerate(fit(a_fixed + f_fixed, kv_need, True)):
            costs = roofline_sim_costs(
                spec, hw, hw, RooflineSetup(batch=B, attention_devices=g, ffn_devices=g, **ep)
            )
            if i == 0:  # the smallest colocated instance as the prefill pool's unit
                handoff = partial(_handoff_ms, spec, hw, RooflineSetup(batch=B, **ep))
                cands.extend(_afd_prefill_candidates(afd_cfgs, g, costs, B, N, handoff))
            k = N // g
            cands.append(
                Candidate(
                    "aggregated",
                    k * g,
                    dict(instances=k, batch=B, instance_devices=g),
                    costs,
                    kv_capacity_tokens=kv_cap(g, a_fixed + f_fixed),
                )
            )
            gp = g
            for n_p in range(1, N // gp):
                n_d = (N - n_p * gp) // g
                if n_d < 1:
                    break
                cands.append(
                    Candidate(
                        "pd-split",
                        n_p * gp + n_d * g,
                        dict(
                            prefill_instances=n_p,
                            decode_instances=n_d,
                            prefill_devices=gp,
                            decode_devices=g,
                            batch=B,
                        ),
                        costs,
                        decode_costs=costs,
                        kv_capacity_tokens=kv_cap(g, a_fixed + f_fixed),
                    )
                )
    if not any(c.family == "afd" for c in cands):
        notes.append("no AFD bundle fits: the FFN instance or one attention instance is too big")
    return cands


def _handoff_ms(spec, hw, setup, attention_devices: int, devices: int) -> float:
    """ms per prompt token of the KV hand-off from a prefill instance to an attention instance
    of `attention_devices` devices, on the link between them: NVLink when the whole deployment
    of `devices` fits in one scale-up domain, else the NICs (the prefill pool then sits on
    other boards than at least part of the decode side)."""
    s = replace(setup, attention_devices=attention_devices)
    return kv_handoff_ms_per_token(spec, hw, s, hw.link_for(devices))


def _afd_prefill_candidates(
    afd_cfgs: list[tuple[int, int, int, int, SimCosts, int]],
    gp: int,
    prefill_costs: SimCosts,
    B: int,
    N: int,
    handoff: Callable[[int, int], float],
) -> list[Candidate]:
    """AFD decode bundles plus n_p colocated prefill instances of gp devices, every split of
    the N devices with at least one of each; the KV of prompt + 1 tokens moves from a prefill
    instance to an attention worker at `handoff(attention devices, deployment devices)` ms a
    token (`kv_transfer_ms_per_token`; `_handoff_ms`)."""
    out = []
    for r, M, gA, gF, costs, kv_cap in afd_cfgs:
        bundle = r * gA + gF
        for n_p in range(1, N // gp):
            k = (N - n_p * gp) // bundle
            if k < 1:
                break
            devices = n_p * gp + k * bundle
            out.append(
                Candidate(
                    "afd+prefill",
                    devices,
                    dict(
                        prefill_instances=n_p,
                        prefill_devices=gp,
                        bundles=k,
                        r=r,
                        microbatches=M,
                        batch=B,
                        attention_devices=gA,
                        ffn_devices=gF,
                    ),
                    prefill_costs,
                    decode_costs=replace(costs, kv_transfer_ms_per_token=handoff(gA, devices)),
                    kv_capacity_tokens=kv_cap,
                )
            )
    return out


def _bundle_config(p: dict[str, Any], prefill: str = "none", **kw: Any) -> BundleConfig:
    return BundleConfig(
        attention_workers=p["r"],
        slots=p["batch"],
        microbatches=p["microbatches"],
        pipeline="microbatch",
        prefill=prefill,
        **kw,
    )


def _screen(
    c: Candidate,
    reqs: RequestSet,
    trace,
    space: SearchSpace,
    seed: int,
    bundle_cache: dict[Any, SimReport] | None = None,
) -> None:
    """Stage 1: saturated throughput (tokens/s of the deployment) and p90 TPOT at full batch.
    AFD bundles are simulated once per (r, M, B, devices) and shared through `bundle_cache`."""
    p = c.params
    steps = space.closed_loop_steps
    mean_d = float(np.mean(reqs.output_len))
    if c.family in ("afd", "afd+prefill"):
        key = (p["r"], p["microbatches"], p["batch"], p["attention_devices"], p["ffn_devices"])
        cache = bundle_cache if bundle_cache is not None else {}
        if key not in cache:
            costs = c.costs if c.family == "afd" else c.decode_costs
            cache[key] = _closed(costs, _bundle_config(p), reqs, steps, seed, mean_d)
        rep = cache[key]
        c.saturated_tpot_p90_ms = rep.tpot_ms.p90 if rep.tpot_ms.count else rep.mean_step_ms
        if c.family == "afd":
            c.capacity_tok_s = rep.throughput_tok_s * p["bundles"]
            return
        prefill_req_s = _prefill_req_s(c.costs, space.token_budget, reqs)
        req_s = min(
            p["bundles"] * rep.throughput_tok_s / mean_d, p["prefill_instances"] * prefill_req_s
        )
        c.capacity_tok_s = req_s * mean_d
        return
    dec_cfg = BundleConfig(slots=p["batch"], pipeline="colocated", prefill="none")
    rep = _closed(c.costs, dec_cfg, reqs, steps, seed, mean_d)
    decode_tok_s = rep.throughput_tok_s
    # prefill capacity of one instance: full token-budget chunks, requests/s
    prefill_req_s = _prefill_req_s(c.costs, space.token_budget, reqs)
    if c.family == "aggregated":
        # an instance shares its time between decode and prefill of what it decodes
        dec_req_s = decode_tok_s / mean_d
        req_s = 1.0 / (1.0 / dec_req_s + 1.0 / prefill_req_s)
        c.capacity_tok_s = req_s * mean_d * p["instances"]
    else:
        req_s = min(
            p["decode_instances"] * decode_tok_s / mean_d, p["prefill_instances"] * prefill_req_s
        )
        c.capacity_tok_s = req_s * mean_d
    c.saturated_tpot_p90_ms = rep.tpot_ms.p90 if rep.tpot_ms.count else rep.mean_step_ms


def trace_cached(trace, prefix_hit_rate: str | float | None) -> np.ndarray | None:
    """Per trace request, the prompt tokens a prefix cache holds: from its hash ids
    (`"trace"`), a given share of every prompt, or None."""
    from afdserve.planner.prefix import cached_from_hash_ids, cached_from_rate

    if prefix_hit_rate is None:
        return None
    if prefix_hit_rate == "trace":
        if trace.path is None:
            raise UserInputError("--prefix-hit-rate trace needs a trace file with hash_ids")
        return cached_from_hash_ids(trace.path)
    try:
        h = float(prefix_hit_rate)
    except (TypeError, ValueError):
        raise UserInputError(
            f"prefix hit rate must be a number in [0, 1) or 'trace', got {prefix_hit_rate!r}"
        ) from None
    return cached_from_rate(trace.prompt_len, h)


def _prefill_req_s(costs: SimCosts, budget: int, reqs: RequestSet) -> float:
    """Requests/s one colocated instance prefills at full token-budget chunks: each request
    computes its uncached prompt tokens (all of them without a prefix cache)."""
    prompt = float(np.mean(reqs.prompt_len))
    new = prompt
    if reqs.cached_len is not None:
        new = max(1.0, float(np.mean(reqs.prompt_len - reqs.cached_len)))
    pre_ms = _prefill_chunk_ms(costs, budget, prompt)
    return budget / new / (pre_ms / 1e3)


def _prefill_chunk_ms(costs: SimCosts, budget: int, prompt: float) -> float:
    """One colocated step prefilling `budget` tokens of prompts of mean length `prompt`."""
    s = costs.stages
    n_prompts = max(1.0, budget / max(prompt, 1.0))
    n = budget / n_prompts
    pairs = n_prompts * n * (n + 1) / 2.0
    attn = (
        s.attention.alpha * budget
        + s.attention.beta
        + costs.prefill_token_ms * budget
        + costs.prefill_pair_ms * pairs
    )
    a2a = costs.colocated_a2a_ms_per_token * budget + costs.colocated_a2a_beta_ms
    return s.num_layers * (attn + s.ffn(budget) + a2a) + costs.step_beta_ms


def _closed(
    costs: SimCosts, cfg: BundleConfig, reqs: RequestSet, steps: int, seed: int, mean_d: float
) -> SimReport:
    n_req = int(steps * cfg.num_slots / max(mean_d, 1.0) * 1.3) + 2 * cfg.num_slots
    cl = closed_loop(
        reqs.prompt_len, reqs.output_len, num_slots=cfg.num_slots, num_requests=n_req, seed=seed
    )
    run = run_unit(costs, cfg, cl, closed_loop=True, max_steps=steps)
    return summarize([run])


def _deploy(c: Candidate, reqs: RequestSet, slo: SLO, space: SearchSpace):
    """(report, runs) of the candidate serving `reqs`."""
    p = c.params
    if c.family == "afd":
        cfg = BundleConfig(
            attention_workers=p["r"],
            slots=p["batch"],
            microbatches=p["microbatches"],
            pipeline="microbatch",
            prefill="chunked",
            token_budget=max(space.token_budget, p["batch"]),
            kv_capacity_tokens=c.kv_capacity_tokens or None,
        )
        return run_afd(c.costs, cfg, reqs, bundles=p["bundles"], devices=c.devices, slo=slo)
    if c.family == "afd+prefill":
        dec = _bundle_config(p, kv_capacity_tokens=c.kv_capacity_tokens or None)
        return run_pd_split(
            c.costs,
            c.decode_costs or c.costs,
            reqs,
            prefill_instances=p["prefill_instances"],
            decode_instances=p["bundles"],
            prefill_slots=p["batch"],
            decode_slots=p["batch"],
            token_budget=max(space.token_budget, p["batch"]),
            devices=c.devices,
            slo=slo,
            label="afd+prefill",
            decode_config=dec,
        )
    if c.family == "aggregated":
        return run_aggregated(
            c.costs,
            reqs,
            instances=p["instances"],
            slots=p["batch"],
            token_budget=max(space.token_budget, p["batch"]),
            kv_capacity_tokens=c.kv_capacity_tokens or None,
            devices=c.devices,
            slo=slo,
        )
    return run_pd_split(
        c.costs,
        c.decode_costs or c.costs,
        reqs,
        prefill_instances=p["prefill_instances"],
        decode_instances=p["decode_instances"],
        prefill_slots=p["batch"],
        decode_slots=p["batch"],
        token_budget=max(space.token_budget, p["batch"]),
        kv_capacity_tokens=c.kv_capacity_tokens or None,
        devices=c.devices,
        slo=slo,
    )


def _max_rate(
    c: Candidate,
    trace,
    requests: int,
    slo: SLO,
    space: SearchSpace,
    seed: int,
    tick,
    cached: np.ndarray | None = None,
) -> None:
    """Bisection on the request rate for the highest one whose attainment meets the target."""
    mean_d = float(np.mean(np.maximum(trace.output_len[:requests], 1)))
    cap = c.capacity_tok_s / mean_d  # req/s at saturation
    arrivals = "trace" if trace.arrival_s is not None else "poisson"

    def attempt(rate: float):
        reqs = from_trace(
            trace, limit=requests, arrivals=arrivals, rate=rate, seed=seed, cached=cached
        )
        tick("simulate", 1)
        return _deploy(c, reqs, slo, space)

    lo, hi = 0.05 * cap, 1.2 * cap
    rep, runs = attempt(lo)
    if (rep.slo_attainment or 0.0) < space.attainment:
        c.max_rate, c.report, c.samples = None, rep, latency_samples(runs)
        return
    best = (lo, rep, runs)
    for _ in range(space.bisection_steps):
        mid = math.sqrt(lo * hi)
        rep, runs = attempt(mid)
        if (rep.slo_attainment or 0.0) >= space.attainment:
            lo, best = mid, (mid, rep, runs)
        else:
            hi = mid
    c.max_rate, c.report, c.samples = best[0], best[1], latency_samples(best[2])


def ratio_sweep_for(
    c: Candidate, trace, space: SearchSpace, seed: int = 0
) -> list[tuple[int, SimReport]]:
    """For a plot: the AFD candidate's bundle simulated (closed loop) at r = 1..max(ratios)."""
    reqs = from_trace(trace, arrivals="offline")
    mean_d = float(np.mean(reqs.output_len))
    out = []
    for r in space.ratios:
        cfg = BundleConfig(
            attention_workers=r,
            slots=c.params["batch"],
            microbatches=c.params["microbatches"],
            pipeline="microbatch",
            prefill="none",
        )
        out.append((r, _closed(c.costs, cfg, reqs, space.closed_loop_steps, seed, mean_d)))
    return out


def with_space(space: SearchSpace, **kw: Any) -> SearchSpace:
    return replace(space, **kw)
