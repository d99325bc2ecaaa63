"""The pictures of a design-space search (`afdserve simulate --plot DIR`).

A search result holds the best candidate of each family with its latency samples, but not the
runs that explain its AFD pick: why that r, and what a step of it looks like. So besides the
latency CDFs this re-simulates the AFD winner: a sweep of r at its B and M beside the planner's
closed form, and two steps of its pipeline in steady state.
"""

from __future__ import annotations

from pathlib import Path

from afdserve.sim.search import SearchResult


def plot_search(result: SearchResult, out: Path, seed: int = 0) -> None:
    """latency_cdf.png (the best of each family), and for the best AFD candidate (or the first
    AFD finalist if none met the SLOs) ratio_sweep.png and timeline.png."""
    from afdserve.planner import load_trace, plan, stats_from_trace
    from afdserve.sim.closed_loop import simulate_closed_loop
    from afdserve.sim.config import BundleConfig
    from afdserve.sim.pipeline import StageTimes
    from afdserve.sim.plots import plot_latency_cdfs, plot_ratio_sweep, plot_timeline
    from afdserve.sim.validate_theory import RatioSweep, WorkloadCase, workload_source

    out.mkdir(parents=True, exist_ok=True)
    samples = {
        f"{fam}: {c.describe()}": c.samples for fam, c in result.best.items() if c and c.samples
    }
    if samples:
        plot_latency_cdfs(
            samples,
            out / "latency_cdf.png",
            slo={"ttft_ms": result.slo.ttft_ms, "tpot_ms": result.slo.tpot_ms},
            title=f"{result.model} on {result.hardware}, {result.workload} (best of each family)",
        )
    afd = result.best.get("afd") or next((c for c in result.finalists if c.family == "afd"), None)
    if afd is None:
        return
    trace = load_trace(result.workload)
    stats = stats_from_trace(trace)
    _, make = workload_source(WorkloadCase(result.workload, trace=result.workload))
    B, M = afd.params["batch"], afd.params["microbatches"]
    p = plan(afd.costs.stages, B, stats, r_max=max(result.space.ratios))
    sweep = RatioSweep(
        afd.costs,
        B,
        stats,
        make,
        steps=result.space.closed_loop_steps,
        seed=seed,
        pipeline="microbatch",
        microbatches=M,
        table=p.table,
    )
    points = [sweep.run(r) for r in result.space.ratios]
    plot_ratio_sweep(
        points,
        out / "ratio_sweep.png",
        title=f"{result.model} on {result.hardware}, {result.workload}: B={B}, M={M} "
        "(simulated: exact microbatch pipeline; closed form: planner)",
        marks={"r*": p.r_star},
    )
    r = afd.params["r"]
    cfg = BundleConfig(
        attention_workers=r, slots=B, microbatches=M, pipeline="microbatch", prefill="none"
    )
    reqs = make(r * B, 4 * r * B, seed)
    run = simulate_closed_loop(afd.costs, cfg, reqs, max_steps=3, timeline_steps=3)
    if run.timeline:
        plot_timeline(
            StageTimes.concat(run.timeline),
            afd.costs.num_layers,
            out / "timeline.png",
            steps=2,
            title=f"{r}A1F, M={M}, B={B}: two steps in steady state ({result.workload})",
        )
