"""Theory vs simulation: does the planner's closed-form ratio pick the ratio the simulator finds
best?

For each case (a set of stage coefficients and a workload), the simulator sweeps r = 1..r_max in
the theory's own setting (closed loop: every freed slot refilled at once, prompts already in the
KV cache, the ideal pipeline tau = max of the stages) but with what the closed form averages
away: each attention worker's own resident context (contexts drift as requests grow and turn
over), the barrier of the slowest worker each step, and B slots of whole requests. It then
compares the simulated best integer ratio r_sim with the planner's closed-form integer
(`r_int_unconstrained`, from r*) and its barrier-aware integer (`r_int_barrier`).

The gap of a ratio is the throughput it loses in simulation against the simulated optimum:
gap(r) = 1 - thr_sim(r) / thr_sim(r_sim) (the paper's "within 10% of the simulated optimum").
Simulations of different r share their request sequence (common random numbers) and start in
the stationary state, so the comparison between neighbouring r is not swamped by noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from afdserve.sim.closed_loop import simulate_closed_loop
from afdserve.sim.config import BundleConfig
from afdserve.sim.costs import SimCosts
from afdserve.sim.metrics import summarize
from afdserve.sim.requests import closed_loop, closed_loop_from_distributions

R_LIMIT = 256
"""Largest ratio a case's sweep extends to."""


@dataclass(frozen=True)
class CoefficientSet:
    name: str
    costs: SimCosts
    batch: int


@dataclass(frozen=True)
class WorkloadCase:
    """A trace (by name or path) or a pair of distribution specs."""

    name: str
    trace: str | None = None
    prompt: str | None = None
    output: str | None = None


@dataclass
class RatioPoint:
    r: int
    sim_throughput_per_instance: float
    """Tokens/s per instance, simulated."""
    theory_throughput_per_instance: float
    """Mean field (planner), tokens/s per instance."""
    barrier_throughput_per_instance: float | None
    sim_attention_idle: float
    sim_ffn_idle: float
    theory_attention_idle: float
    theory_ffn_idle: float
    sim_mean_context: float
    steps: int


@dataclass
class CaseResult:
    coefficients: str
    workload: str
    batch: int
    num_layers: int
    theta: float
    sigma2: float | None
    r_star: float
    r_closed_form: int
    r_barrier: int | None
    r_sim: int
    gap_closed_form: float
    gap_barrier: float | None
    points: list[RatioPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return _finite(d)


@dataclass
class TheoryValidation:
    cases: list[CaseResult]
    steps: int

    def gaps(self, which: str = "closed_form") -> np.ndarray:
        key = "gap_closed_form" if which == "closed_form" else "gap_barrier"
        vals = [getattr(c, key) for c in self.cases]
        return np.asarray([v for v in vals if v is not None], dtype=np.float64)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cases": len(self.cases), "steps_per_run": self.steps}
        for which in ("closed_form", "barrier"):
            g = self.gaps(which)
            if g.size == 0:
                continue
            out[which] = {
                "n": int(g.size),
                "min": float(g.min()),
                "median": float(np.median(g)),
                "p90": float(np.quantile(g, 0.9)),
                "max": float(g.max()),
                "within_5pct": float(np.mean(g <= 0.05)),
                "within_10pct": float(np.mean(g <= 0.10)),
                "exact_r": float(
                    np.mean(
                        [
                            (c.r_closed_form if which == "closed_form" else c.r_barrier) == c.r_sim
                            for c in self.cases
                            if which == "closed_form" or c.r_barrier is not None
                        ]
                    )
                ),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "cases": [c.to_dict() for c in self.cases]}


def default_coefficient_sets() -> list[CoefficientSet]:
    """Six coefficient sets: the issue's explicit example, a communication-heavy explicit set,
    and roofline coefficients of four catalog models on catalog hardware (planner docs)."""
    from afdserve.planner import RooflineSetup, load_hardware, load_model
    from afdserve.planner.roofline import DEVICE_COUNTS, memory_model, smallest_device_count
    from afdserve.sim.costs import roofline_sim_costs

    sets = [
        CoefficientSet("issue-example", SimCosts.explicit(5e-5, 0.6, 0.02, 1.0, 0.005, 0.2), 64),
        CoefficientSet("comm-heavy", SimCosts.explicit(2e-5, 0.3, 0.01, 1.2, 0.03, 0.6), 64),
    ]
    for model, a_hw, f_hw, batch in (
        ("llama-3.1-8b", "h100", "h100", 64),
        ("qwen3-30b-a3b", "h100", "h100", 64),
        ("mixtral-8x7b", "h100", "h100", 128),
        ("qwen3-235b-a22b", "h20", "h800", 64),
    ):
        spec = load_model(model)
        ahw, fhw = load_hardware(a_hw), load_hardware(f_hw)
        probe = memory_model(spec, ahw, fhw, RooflineSetup(batch=batch))
        usable = 0.9
        ga = smallest_device_count(probe.attention_fixed_bytes * 1.5, ahw.memory_bytes, usable)
        gf = smallest_device_count(probe.ffn_fixed_bytes * 1.2, fhw.memory_bytes, usable)
        setup = RooflineSetup(
            batch=batch,
            attention_devices=ga or DEVICE_COUNTS[-1],
            ffn_devices=gf or DEVICE_COUNTS[-1],
        )
        costs = roofline_sim_costs(spec, ahw, fhw, setup)
        sets.append(CoefficientSet(f"{model}/{a_hw}+{f_hw}", costs, batch))
    return sets


def default_workloads() -> list[WorkloadCase]:
    """The four shared traces and two heavy-tailed synthetic workloads."""
    return [
        WorkloadCase("azure-conv", trace="azure-conv"),
        WorkloadCase("azure-code", trace="azure-code"),
        WorkloadCase("mooncake-conv", trace="mooncake"),
        WorkloadCase("mooncake-synthetic", trace="mooncake-synthetic"),
        WorkloadCase("lognormal", prompt="lognormal:7:1", output="lognormal:5:1.2"),
        WorkloadCase("geometric", prompt="lognormal:6.5:0.8", output="geometric:0.004"),
    ]


def _workload_source(w: WorkloadCase):
    """(stats, maker(num_slots, num_requests, seed) -> RequestSet)."""
    from afdserve.planner import (
        load_trace,
        parse_distribution,
        stats_from_distributions,
        stats_from_trace,
    )

    if w.trace is not None:
        tr = load_trace(w.trace)
        stats = stats_from_trace(tr)

        def make(num_slots: int, num_requests: int, seed: int):
            return closed_loop(
                tr.prompt_len,
                tr.output_len,
                num_slots=num_slots,
                num_requests=num_requests,
                seed=seed,
                name=w.name,
            )

        return stats, make
    p, o = parse_distribution(w.prompt or ""), parse_distribution(w.output or "")
    stats = stats_from_distributions(p, o)

    def make(num_slots: int, num_requests: int, seed: int):
        return closed_loop_from_distributions(
            p, o, num_slots=num_slots, num_requests=num_requests, seed=seed
        )

    return stats, make


class RatioSweep:
    """Closed-loop simulations of one bundle shape at chosen ratios r, beside the planner's
    closed form for the same coefficients, batch and workload statistics."""

    def __init__(
        self,
        costs: SimCosts,
        batch: int,
        stats: Any,
        make: Callable[[int, int, int], Any],
        *,
        steps: int,
        seed: int = 0,
        pipeline: str = "ideal",
        microbatches: int = 1,
        table: Sequence[Any] = (),
    ) -> None:
        self.costs, self.batch, self.stats, self.make = costs, batch, stats, make
        self.steps, self.seed = steps, seed
        self.pipeline, self.microbatches = pipeline, microbatches
        self.table = {row.r: row for row in table}
        self.points: dict[int, RatioPoint] = {}

    def run(self, r: int) -> RatioPoint:
        from afdserve.planner import plan

        if r in self.points:
            return self.points[r]
        B, steps = self.batch, self.steps
        n_slots = r * B
        mean_d = float(self.stats.mean_output or 1.0)
        n_req = int(steps * n_slots / max(mean_d, 1.0) * 1.3) + 2 * n_slots
        reqs = self.make(n_slots, n_req, self.seed)
        cfg = BundleConfig(
            attention_workers=r,
            slots=B,
            microbatches=self.microbatches,
            pipeline=self.pipeline,
            prefill="none",
        )
        run = simulate_closed_loop(self.costs, cfg, reqs, max_steps=steps)
        rep = summarize([run])
        row = self.table.get(r) or plan(self.costs.stages, B, self.stats, r_max=r).row(r)
        point = RatioPoint(
            r=r,
            sim_throughput_per_instance=rep.throughput_per_instance,
            theory_throughput_per_instance=row.throughput_per_instance * 1e3,
            barrier_throughput_per_instance=(
                None
                if row.throughput_per_instance_barrier is None
                else row.throughput_per_instance_barrier * 1e3
            ),
            sim_attention_idle=rep.attention_idle,
            sim_ffn_idle=rep.ffn_idle if rep.ffn_idle is not None else math.nan,
            theory_attention_idle=row.attention_idle,
            theory_ffn_idle=row.ffn_idle,
            sim_mean_context=rep.mean_context_per_slot or math.nan,
            steps=rep.steps,
        )
        self.points[r] = point
        return point


def workload_source(w: WorkloadCase):
    """(stats, make(num_slots, num_requests, seed) -> closed-loop RequestSet) of a workload."""
    return _workload_source(w)


def validate_case(
    cs: CoefficientSet,
    w: WorkloadCase,
    *,
    steps: int = 4000,
    r_cap: int = 32,
    seed: int = 0,
    source=None,
) -> CaseResult:
    from afdserve.planner import plan

    stats, make = source if source is not None else _workload_source(w)
    B = cs.batch
    p = plan(cs.costs.stages, B, stats)
    r_hi = max(8, math.ceil(2 * p.r_star) + 2, p.r_int_unconstrained + 2)
    if p.r_int_barrier is not None:
        r_hi = max(r_hi, p.r_int_barrier + 2)
    r_hi = min(r_hi, r_cap)
    sweep = RatioSweep(cs.costs, B, stats, make, steps=steps, seed=seed, table=p.table)
    points = sweep.points
    simulate_r = sweep.run

    for r in range(1, r_hi + 1):
        simulate_r(r)
    # the simulated optimum must be inside the sweep: extend while it sits on the edge
    while True:
        r_top = max(points)
        best = max(points, key=lambda r: points[r].sim_throughput_per_instance)
        if best < r_top or r_top >= R_LIMIT:
            break
        for r in range(r_top + 1, min(R_LIMIT, 2 * r_top) + 1):
            simulate_r(r)
    # the planner's integers are always simulated, even beyond the sweep
    simulate_r(p.r_int_unconstrained)
    if p.r_int_barrier is not None:
        simulate_r(p.r_int_barrier)
    thr = {r: pt.sim_throughput_per_instance for r, pt in points.items()}
    r_sim = max(thr, key=lambda r: thr[r])

    def gap(r: int) -> float:
        return 1.0 - thr[r] / thr[r_sim]

    return CaseResult(
        coefficients=cs.name,
        workload=w.name,
        batch=B,
        num_layers=cs.costs.num_layers,
        theta=stats.theta,
        sigma2=stats.sigma2,
        r_star=p.r_star,
        r_closed_form=p.r_int_unconstrained,
        r_barrier=p.r_int_barrier,
        r_sim=r_sim,
        gap_closed_form=gap(p.r_int_unconstrained),
        gap_barrier=None if p.r_int_barrier is None else gap(p.r_int_barrier),
        points=[points[r] for r in sorted(points)],
    )


def validate_theory(
    coefficient_sets: Sequence[CoefficientSet] | None = None,
    workloads: Sequence[WorkloadCase] | None = None,
    *,
    steps: int = 4000,
    r_cap: int = 32,
    seed: int = 0,
    progress: Callable[[int], Any] | None = None,
) -> TheoryValidation:
    """Every coefficient set against every workload (default: 6 x 6 = 36 cases)."""
    sets = list(coefficient_sets or default_coefficient_sets())
    loads = list(workloads or default_workloads())
    sources = [_workload_source(w) for w in loads]
    cases = []
    for cs in sets:
        for w, src in zip(loads, sources, strict=True):
            cases.append(validate_case(cs, w, steps=steps, r_cap=r_cap, seed=seed, source=src))
            if progress is not None:
                progress(1)
    return TheoryValidation(cases, steps)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
