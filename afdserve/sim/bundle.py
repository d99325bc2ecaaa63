"""One given rA-1F bundle, simulated request by request (`afdserve simulate --ratio`).

The search (`afdserve.sim.search`) decides which deployment to build; this answers how one
chosen bundle behaves: its requests are a saturated closed loop (the planner's setting) or a
trace replayed with its own or synthetic arrivals, and the report gives every latency
percentile. `plot_bundle` pictures it: the pipeline in steady state and the latency CDFs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afdserve.planner.workload import Trace
from afdserve.sim.config import BundleConfig
from afdserve.sim.costs import SimCosts
from afdserve.sim.deployments import run_unit
from afdserve.sim.metrics import SLO, SimReport, summarize
from afdserve.sim.requests import closed_loop, from_trace
from afdserve.sim.run import SimRun


@dataclass(frozen=True)
class BundleSimulation:
    """What `simulate_bundle` ran (all of it, so that the plots can re-run the same bundle)."""

    costs: SimCosts
    config: BundleConfig
    trace: Trace
    run: SimRun
    report: SimReport


def bundle_config(
    ratio: int, batch: int, microbatches: int, token_budget: int, *, saturated: bool
) -> BundleConfig:
    """r attention workers of `batch` slots and one FFN, exactly pipelined over `microbatches`.
    A saturated closed loop starts with its prompts cached (no prefill), as the theory does;
    the budget is at least one token per slot, so that a full decode step always fits."""
    return BundleConfig(
        attention_workers=ratio,
        slots=batch,
        microbatches=microbatches,
        pipeline="microbatch",
        prefill="none" if saturated else "chunked",
        token_budget=max(token_budget, batch),
    )


def simulate_bundle(
    costs: SimCosts,
    trace: Trace,
    config: BundleConfig,
    *,
    requests: int,
    saturated: bool = False,
    arrivals: str = "trace",
    rate: float | None = None,
    cv: float = 1.0,
    seed: int = 0,
    slo: SLO | None = None,
    engine: str = "fast",
    cached: np.ndarray | None = None,
) -> BundleSimulation:
    """Simulate `config` on `trace`'s requests: with `saturated`, a closed loop of lengths drawn
    from the trace (at least 4 per slot, so the loop reaches steady state); otherwise the first
    `requests` of the trace, arriving by its timestamps (`rate` rescales them) or as a Poisson
    or Gamma (`cv`) process at `rate`. `engine`: "fast" (the step engine) or "reference" (the
    replica on the runtime's scheduler, sim/replica.py)."""
    if saturated:
        reqs = closed_loop(
            trace.prompt_len,
            trace.output_len,
            num_slots=config.num_slots,
            num_requests=max(requests, 4 * config.num_slots),
            seed=seed,
            name=trace.name,
        )
    else:
        reqs = from_trace(
            trace, limit=requests, arrivals=arrivals, rate=rate, cv=cv, seed=seed, cached=cached
        )
    run = run_unit(costs, config, reqs, closed_loop=saturated, engine=engine)
    label = f"{config.attention_workers}A1F M={config.microbatches} B={config.slots}"
    report = summarize([run], label=label, slo=slo)
    return BundleSimulation(costs, config, trace, run, report)


def plot_bundle(sim: BundleSimulation, out: Path, *, slo: SLO, seed: int = 0) -> None:
    """timeline.png: two steps of the bundle in steady state (a short closed loop of it, since
    an open-loop run's steps are mostly ramp-up or drain); latency_cdf.png: the run's TTFT,
    TPOT and ITL distributions against the SLOs."""
    from afdserve.sim.pipeline import StageTimes
    from afdserve.sim.plots import latency_samples, plot_latency_cdfs, plot_timeline

    out.mkdir(parents=True, exist_ok=True)
    cfg = sim.config
    steady = closed_loop(
        sim.trace.prompt_len,
        sim.trace.output_len,
        num_slots=cfg.num_slots,
        num_requests=4 * cfg.num_slots,
        seed=seed,
    )
    cl = run_unit(
        sim.costs,
        dataclasses.replace(cfg, prefill="none"),
        steady,
        closed_loop=True,
        max_steps=3,
        timeline_steps=3,
    )
    plot_timeline(
        StageTimes.concat(cl.timeline),
        sim.costs.num_layers,
        out / "timeline.png",
        steps=2,
        title=f"{sim.report.label}: two steps in steady state (closed loop, {sim.trace.name})",
    )
    plot_latency_cdfs(
        {sim.report.label: latency_samples([sim.run])},
        out / "latency_cdf.png",
        slo={"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
    )
