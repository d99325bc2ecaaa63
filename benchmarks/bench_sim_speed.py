"""Simulator speed: simulated seconds per wall-clock second, and the r = 1..16 sweep time.

    python benchmarks/bench_sim_speed.py [--model llama-3.1-8b] [--hardware h100] [--json]

1. An 8A1F bundle with 256 slots per attention worker (roofline costs of --model on
   --hardware, the microbatch pipeline with M = 2) on the Azure conversation trace:
   - closed loop, bulk path (`simulate_closed_loop`);
   - closed loop through the step engine (`simulate(..., stop_when_unfilled=True)`);
   - open loop: the trace's arrivals rescaled to 80% of the bundle's closed-loop capacity, with
     chunked prefill and the KV capacity of one device.
2. The r = 1..16 sweep over the whole Azure conversation trace (every request once, in trace
   order, closed loop, B = 64, M = 2), the per-r runs one after another on one core.

Everything runs in this process, single-threaded (numpy); timings are wall-clock, the best of
--repeats runs (the machine is shared: the minimum is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from afdserve.planner import RooflineSetup, load_hardware, load_model, load_trace
from afdserve.sim import (
    BundleConfig,
    RequestSet,
    closed_loop,
    from_trace,
    roofline_sim_costs,
    simulate,
    simulate_closed_loop,
    summarize,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--hardware", default="h100")
    ap.add_argument("--steps", type=int, default=20_000, help="closed-loop steps (bulk path)")
    ap.add_argument("--open-requests", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    def best_of(fn):
        """(result, best wall seconds) over args.repeats runs."""
        walls, res = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = fn()
            walls.append(time.perf_counter() - t0)
        return res, min(walls)

    spec, hw = load_model(args.model), load_hardware(args.hardware)
    trace = load_trace("azure-conv")
    out: dict = {"model": args.model, "hardware": args.hardware, "trace": trace.name}

    # ---- 8A1F x 256 slots ----------------------------------------------------------------
    B, r, M = 256, 8, 2
    costs = roofline_sim_costs(spec, hw, hw, RooflineSetup(batch=B, ffn_devices=2))
    cfg = BundleConfig(attention_workers=r, slots=B, microbatches=M, prefill="none")
    n_req = int(args.steps * r * B / trace.output_len.mean() * 1.3)
    reqs = closed_loop(trace.prompt_len, trace.output_len, num_slots=r * B, num_requests=n_req)
    rows = []
    run, wall = best_of(lambda: simulate_closed_loop(costs, cfg, reqs, max_steps=args.steps))
    rows.append(("closed loop, bulk", run, wall))
    eng_steps = min(args.steps, 5000)
    run_e, wall = best_of(
        lambda: simulate(costs, cfg, reqs, stop_when_unfilled=True, max_steps=eng_steps)
    )
    rows.append(("closed loop, step engine", run_e, wall))
    cap_tok_s = summarize([run]).throughput_tok_s
    rate = 0.8 * cap_tok_s / trace.output_len[: args.open_requests].mean()
    open_reqs = from_trace(trace, limit=args.open_requests, rate=rate)
    kv = int((hw.memory_bytes * 0.9 - 3e9) / (spec.num_layers * spec.kv_elems_per_token * 2))
    ocfg = BundleConfig(attention_workers=r, slots=B, microbatches=M, kv_capacity_tokens=kv)
    run_o, wall = best_of(lambda: simulate(costs, ocfg, open_reqs))
    rows.append((f"open loop at {rate:.0f} req/s, chunked prefill", run_o, wall))
    speed = []
    for name, rn, wall in rows:
        sim_s = rn.sim_time_ms / 1e3
        speed.append(
            {
                "run": name,
                "steps": rn.num_steps,
                "simulated_s": sim_s,
                "wall_s": wall,
                "sim_s_per_wall_s": sim_s / wall,
                "us_per_step": wall / rn.num_steps * 1e6,
                "mean_step_ms": float(np.mean(rn.step_duration)),
            }
        )
    out["bundle_8A1F_256"] = speed

    # ---- r = 1..16 over the whole trace ----------------------------------------------------
    full = RequestSet(
        trace.prompt_len, np.maximum(trace.output_len, 1), np.zeros(len(trace)), name=trace.name
    )

    def sweep_all() -> list[dict]:
        rows = []
        for rr in range(1, 17):
            c = roofline_sim_costs(spec, hw, hw, RooflineSetup(batch=64))
            cfg_r = BundleConfig(attention_workers=rr, slots=64, microbatches=2, prefill="none")
            t0 = time.perf_counter()
            rn = simulate_closed_loop(c, cfg_r, full)
            rep = summarize([rn])
            rows.append(
                {
                    "r": rr,
                    "steps": rn.num_steps,
                    "wall_s": time.perf_counter() - t0,
                    "throughput_per_instance": rep.throughput_per_instance,
                }
            )
        return rows

    sweep, wall = best_of(sweep_all)
    out["sweep_r_1_16"] = {"wall_s": wall, "runs": sweep}

    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{args.model} on {args.hardware}, {trace.name}: 8A1F, B = 256, M = 2")
    print(
        f"{'run':<44} {'steps':>7} {'sim s':>8} {'wall s':>7} {'sim s/wall s':>12} {'us/step':>8}"
    )
    for s in speed:
        print(
            f"{s['run']:<44} {s['steps']:>7d} {s['simulated_s']:>8.1f} {s['wall_s']:>7.2f} "
            f"{s['sim_s_per_wall_s']:>12.0f} {s['us_per_step']:>8.1f}"
        )
    sw = out["sweep_r_1_16"]
    steps = sum(x["steps"] for x in sw["runs"])
    print(
        f"sweep r = 1..16 over all {len(trace)} requests of {trace.name} (B = 64, M = 2): "
        f"{sw['wall_s']:.1f} s wall, {steps} steps"
    )


if __name__ == "__main__":
    main()
