"""Simulation vs the real runtime: step time and tokens/s.

    python benchmarks/bench_sim_vs_runtime.py [--model builtin:tiny-llama] [--threads 1] [--json]
    python benchmarks/bench_sim_vs_runtime.py --transport shm   # AFD runs in worker processes

Profiles the model on this machine (`afdserve profile`, default grid), then for each workload
runs the real engine (`LLM.generate`, aggregated M = 1, AFD 1A1F M = 1 and M = 2 over the
in-process transport; the fastest of --repeats timed runs after a warm-up, over --rounds passes spread in time; the
profile likewise keeps each point's fastest of --rounds passes) and simulates the same
runs from the profile. Same as `afdserve sim-validate runtime`, over several batch shapes.
With --transport shm|tcp the AFD runs go through real worker processes and are simulated with
that transport's timed transfer cost.
"""

from __future__ import annotations

import argparse
import json
import time

from afdserve.calibration.grid import ProfileGrid
from afdserve.calibration.profile import run_profile
from afdserve.calibration.validate_runtime import (
    DEFAULT_RUNS,
    RuntimeRun,
    Workload,
    validate_runtime,
)

WORKLOADS = (Workload(8, 32, 64), Workload(16, 64, 64), Workload(32, 128, 32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="passes through everything, fastest kept")
    ap.add_argument("--transport", default="local", help="AFD runs: local (threads), shm or tcp")
    ap.add_argument("--pin-workers", action="store_true", help="pin worker processes to cores")
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="re-time the worker-process extras right before each round's real runs",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = tuple(
        RuntimeRun(r.mode, r.microbatches, transport=args.transport if r.mode == "afd" else "local")
        for r in DEFAULT_RUNS
    )
    t0 = time.perf_counter()
    profile = run_profile(
        args.model,
        device=args.device,
        grid=ProfileGrid(repeats=11),
        transports=("local", "copy", *([args.transport] if args.transport != "local" else [])),
        threads=args.threads,
        rounds=args.rounds,
        pin_workers=args.pin_workers,
    )
    results = []
    for w in WORKLOADS:
        v = validate_runtime(
            args.model,
            device=args.device,
            profile=profile,
            workload=w,
            runs=runs,
            threads=args.threads,
            repeats=args.repeats,
            rounds=args.rounds,
            pin_workers=args.pin_workers,
            interleave=args.interleave,
        )
        results.append(v.to_dict())
    wall = time.perf_counter() - t0
    if args.json:
        print(
            json.dumps(
                {"profile": results[0]["profile"], "results": results, "wall_s": wall}, indent=2
            )
        )
        return
    p = results[0]["profile"]
    print(f"{args.model} on {p['device']} ({p['dtype']}), profiled in {p['wall_s']:.1f} s")
    for key in ("attention", "ffn", "comm", "step"):
        e = p[key]
        print(
            f"  {key:<9} alpha {e['alpha']:.4e} beta {e['beta']:.4e} R^2 {e['r2']:.3f} max rel err {e['max_rel_err']:.3f}"
        )
    print(f"  AFD step extra {p['step'].get('afd_beta', 0):.4g} ms; prefill {p['prefill']}")
    for name, t in p.get("worker_steps", {}).items():
        if "afd_beta" in t:
            print(
                f"  worker processes over {name}: afd_alpha {t['afd_alpha']:.4g} ms/seq, "
                f"afd_beta {t['afd_beta']:.4g} ms, afd_prefill_token_ms "
                f"{t.get('afd_prefill_token_ms', 0):.4g}, afd_microbatch_ms "
                f"{t.get('afd_microbatch_ms', 0):.4g}"
                + (" (workers pinned)" if args.pin_workers else "")
            )
    print(
        f"{'workload':<22} {'run':<26} {'real ms/step':>12} {'sim ms/step':>11} {'error':>7} "
        f"{'real tok/s':>10} {'sim tok/s':>9} {'error':>7} {'load':>5} {'serial ms':>9} {'error':>7}"
    )
    for res in results:
        w = res["workload"]
        name = f"{w['requests']} x ({w['prompt_len']}, {w['output_len']})"
        for r in res["runs"]:
            print(
                f"{name:<22} {r['run']:<26} {r['real_step_ms']:>12.3f} {r['sim_step_ms']:>11.3f} "
                f"{r['step_ms_error']:>+7.1%} {r['real_tokens_per_s']:>10.0f} "
                f"{r['sim_tokens_per_s']:>9.0f} {r['tokens_per_s_error']:>+7.1%} "
                f"{r['load_average']:>5.2f} "
                + (
                    f"{r['sim_serial_step_ms']:>9.3f} {r['serial_step_ms_error']:>+7.1%}"
                    if r["sim_serial_step_ms"] is not None
                    else f"{'-':>9} {'-':>7}"
                )
            )
    for res in results:
        for name, rounds in res.get("interleaved", {}).items():
            w = res["workload"]
            print(
                f"re-timed over {name} before the {w['requests']} x ({w['prompt_len']}, "
                f"{w['output_len']}) rounds: afd_beta "
                + ", ".join(f"{e['afd_beta']:.3g}" for e in rounds)
                + " ms; afd_alpha "
                + ", ".join(f"{e['afd_alpha']:.3g}" for e in rounds)
                + " ms/seq; afd_microbatch_ms "
                + ", ".join(f"{e['afd_microbatch_ms']:.3g}" for e in rounds)
                + " ms"
            )
    print(
        f"total {wall:.0f} s; load: 1-minute load average after each real run ({results[0]['cpu_count']} CPUs)"
    )


if __name__ == "__main__":
    main()
