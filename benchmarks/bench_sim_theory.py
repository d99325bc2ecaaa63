"""Theory vs simulation at full size: the gap distribution over 36 cases.

    python benchmarks/bench_sim_theory.py [--steps 8000] [--json] [--plot DIR]

Six coefficient sets (the issue's explicit example, a communication-heavy set, roofline
coefficients of Llama-3.1-8B, Qwen3-30B-A3B and Mixtral-8x7B on H100 and Qwen3-235B-A22B on
H20 + H800) x six workloads (the four shared traces, a lognormal and a geometric synthetic one).
For each, the simulator sweeps r in the theory's setting (closed loop, stationary start, ideal
pipeline) and the gap is the throughput the planner's integer ratio (closed form, and
barrier-aware) loses against the simulated optimum. Same as `afdserve sim-validate theory`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from afdserve.sim.validate_theory import validate_theory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8000, help="steps per simulation (8000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", metavar="DIR")
    args = ap.parse_args()
    t0 = time.perf_counter()
    v = validate_theory(steps=args.steps, seed=args.seed)
    wall = time.perf_counter() - t0
    if args.plot:
        from afdserve.sim.plots import plot_theory_validation

        plot_theory_validation(v, Path(args.plot))
    if args.json:
        d = v.to_dict()
        d["wall_s"] = wall
        print(json.dumps(d, indent=2))
        return
    print(
        f"{'coefficients':<28} {'workload':<19} {'theta':>8} {'r*':>7} {'r_cf':>4} {'r_bar':>5} "
        f"{'r_sim':>5} {'gap_cf':>7} {'gap_bar':>7}"
    )
    for c in v.cases:
        rb = "-" if c.r_barrier is None else str(c.r_barrier)
        gb = "-" if c.gap_barrier is None else f"{c.gap_barrier:.3f}"
        print(
            f"{c.coefficients:<28} {c.workload:<19} {c.theta:>8.0f} {c.r_star:>7.2f} "
            f"{c.r_closed_form:>4d} {rb:>5} {c.r_sim:>5d} {c.gap_closed_form:>7.3f} {gb:>7}"
        )
    s = v.summary()
    for which in ("closed_form", "barrier"):
        g = s[which]
        print(
            f"{which}: n={g['n']} min {g['min']:.3f} median {g['median']:.3f} p90 {g['p90']:.3f} "
            f"max {g['max']:.3f}; within 5%: {g['within_5pct']:.0%}, within 10%: "
            f"{g['within_10pct']:.0%}, same r: {g['exact_r']:.0%}"
        )
    print(f"{len(v.cases)} cases, {args.steps} steps per run, {wall:.1f} s")


if __name__ == "__main__":
    main()
