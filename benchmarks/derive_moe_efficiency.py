"""The MoE FFN's default efficiency, derived from aiconfigurator's measured kernel tables (issue 18).

    python benchmarks/bench_vs_aiconfigurator.py --install-aiconfigurator   # once: its venv
    python benchmarks/derive_moe_efficiency.py [--json]

`Efficiency.moe_flops` (afdserve/planner/roofline.py) is the fraction of peak FP8 FLOP/s that
each extra token of an MoE FFN layer costs on top of streaming the expert weights (the roofline
FFN of an MoE model is their sum, `Efficiency.ffn_combine`). It is not tuned against the
published deployments the validation predicts; it comes from here: aiconfigurator 0.12.0
(NVIDIA, Apache-2.0) ships op-level latency tables measured on each GPU for the fused MoE
layer (routing, permutation, grouped GEMMs, activation, finalize) of TensorRT-LLM, vLLM and
SGLang kernels. Read from its venv (never imported by afdserve), for the one expert shape every
device's table holds (Qwen3-235B-A22B's: hidden 4096, expert intermediate 1536, 128 experts,
top-8), FP8 weights, balanced routing, expert parallel over 4, 8 and 16 GPUs (TP 1):

- per token: the least-squares slope of latency over 4,096-16,384 tokens (the compute-bound
  tail; aiconfigurator's token count is the whole EP group's) against the roofline's
  2 * 3 * hidden * intermediate * top_k / EP FLOPs a token costs one GPU, as a fraction of the
  device's dense FP8 peak (our catalog's figure, the same as aiconfigurator's system file);
- the weight floor: the median latency at 32-256 tokens against the expert weights one GPU
  holds (E * 3 * hidden * intermediate / EP bytes) over its memory bandwidth.

Per device and EP size the fastest kernel collected (every framework and version) is the one
kept: the published deployments run tuned kernels. The default is the median of those twelve
cells (H100, H200, B200, GB200 x EP 4, 8, 16). The median over every kernel is printed beside it,
as the slower end a deployment with untuned kernels would see. A second table lists every
kernel at FastAFD's FFN tray (GB200, EP 4) with its slope over the decode range (256-2048 tokens)
too, by the kernel source aiconfigurator records: whether the kernels FastAFD runs explain how
fast its measured steps grow with k (`sim-validate published`'s growth per tray). Skipped with
one line where the venv is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench_vs_aiconfigurator import ROOT, SYSTEMS, run_in_aic_venv

from afdserve.planner.hardware_catalog import load_hardware
from afdserve.planner.roofline import Efficiency

DEVICES = ("h100", "h200", "b200", "gb200")  # our catalog's names; SYSTEMS maps them
SHAPE = {"hidden": 4096, "inter": 1536, "experts": 128, "topk": 8}
EP_SIZES = (4, 8, 16)

# Runs in aiconfigurator's venv (pandas and pyarrow come with it): per (device, framework,
# version, dtype, EP) the slope over the compute-bound tail and the latency floor, as JSON.
FIT_TABLES = r"""
import glob, json, sys
from pathlib import Path
import numpy as np, pandas as pd
import aiconfigurator_core
root = Path(aiconfigurator_core.__file__).parent / "systems" / "data"
shape = json.loads(sys.argv[1]); eps = json.loads(sys.argv[2]); out = []
for system in sys.argv[3:]:
    for path in sorted(glob.glob(str(root / system / "moe" / "*" / "*" / "moe_perf.parquet"))):
        d = pd.read_parquet(path)
        d = d[(d.hidden_size == shape["hidden"]) & (d.inter_size == shape["inter"])
              & (d.num_experts == shape["experts"]) & (d.topk == shape["topk"])
              & (d.distribution == "balanced") & (d.moe_tp_size == 1)
              & d.moe_ep_size.isin(eps) & d.moe_dtype.isin(["fp8", "fp8_block"])]
        for (src, dtype, ep), g in d.groupby(["kernel_source", "moe_dtype", "moe_ep_size"]):
            lat = g.groupby("num_tokens").latency.median()
            tail = lat[(lat.index >= 4096) & (lat.index <= 16384)]
            decode = lat[(lat.index >= 256) & (lat.index <= 2048)]
            head = lat[(lat.index >= 32) & (lat.index <= 256)]
            if len(tail) < 3 or head.empty:
                continue
            fw, version = Path(path).parts[-3], Path(path).parts[-2]
            out.append({"system": system, "framework": fw, "version": version,
                        "kernel_source": src, "dtype": dtype, "ep": int(ep),
                        "slope_ms_per_token": float(np.polyfit(tail.index, tail.values, 1)[0]),
                        "decode_slope_ms_per_token": float(np.polyfit(
                            decode.index, decode.values, 1)[0]) if len(decode) >= 3 else None,
                        "floor_ms": float(head.median())})
print(json.dumps(out))
"""


def fit_tables(venv: Path) -> list[dict]:
    systems = [SYSTEMS[d] for d in DEVICES]
    return run_in_aic_venv(
        venv, FIT_TABLES, json.dumps(SHAPE), json.dumps(list(EP_SIZES)), *systems, timeout=300
    )


def gpu_flops_per_token(ep: int) -> float:
    """FLOPs one GPU of an EP group spends on a token of the expert shape (its share)."""
    return 2 * 3 * SHAPE["hidden"] * SHAPE["inter"] * SHAPE["topk"] / ep


def efficiencies(fits: list[dict]) -> list[dict]:
    """Each fit as the fraction of peak FP8 FLOP/s per token and of bandwidth at the floor."""
    by_system = {SYSTEMS[d]: d for d in DEVICES}
    h, i, e = SHAPE["hidden"], SHAPE["inter"], SHAPE["experts"]
    rows = []
    for f in fits:
        hw = load_hardware(by_system[f["system"]])
        flops_per_token = gpu_flops_per_token(f["ep"])
        weight_bytes = e * 3 * h * i / f["ep"]  # FP8: one byte a weight
        rows.append(
            {
                **f,
                "device": hw.name,
                "flops_eff": flops_per_token / (f["slope_ms_per_token"] / 1e3) / hw.fp8_flops,
                "floor_bw_eff": weight_bytes / (f["floor_ms"] / 1e3) / hw.memory_bw,
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aic-venv", default=str(ROOT / ".bench" / "aic-venv"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    venv = Path(args.aic_venv)
    if not (venv / "bin" / "python").exists():
        print(f"aiconfigurator: skipped, no venv at {venv} (bench_vs_aiconfigurator.py "
              "--install-aiconfigurator)")  # fmt: skip
        return 0
    rows = efficiencies(fit_tables(venv))
    best = {}
    for r in rows:
        key = (r["device"], r["ep"])
        if key not in best or r["flops_eff"] > best[key]["flops_eff"]:
            best[key] = r
    cells = [best[k] for k in sorted(best)]
    derived = statistics.median(c["flops_eff"] for c in cells)
    every = statistics.median(r["flops_eff"] for r in rows)
    if args.json:
        print(json.dumps({"cells": cells, "all": rows, "derived": derived, "all_median": every}))
        return 0
    print(
        f"MoE FFN per-token efficiency from aiconfigurator's kernel tables (expert shape "
        f"{SHAPE['hidden']}x{SHAPE['inter']}, {SHAPE['experts']} experts, top-{SHAPE['topk']}, "
        f"FP8, balanced, TP 1), {len(rows)} fits:"
    )
    print("| device | EP | fastest kernel | per-token FLOP/s eff | weight-floor BW eff |")
    print("|---|---|---|---|---|")
    for c in cells:
        kernel = f"{c['framework']} {c['version']} {c['dtype']}"
        print(
            f"| {c['device']} | {c['ep']} | {kernel} | {c['flops_eff']:.3f} "
            f"| {c['floor_bw_eff']:.3f} |"
        )
    print(f"median of the {len(cells)} fastest cells: {derived:.3f} "
          f"(Efficiency().moe_flops = {Efficiency().moe_flops})")  # fmt: skip
    print(f"median over all {len(rows)} kernel fits: {every:.3f} (untuned kernels' end)")
    print_fastafd_tray(rows)
    return 0


def print_fastafd_tray(rows: list[dict]) -> None:
    """Every kernel at FastAFD's FFN tray (GB200, EP 4) in ns a token, over the decode range
    (256-2048 tokens, what its microbatches hold) and the tail, beside the per-token FFN cost
    that a line through FastAFD's measured 16K steps implies: whether the kernels it runs
    (DeepGEMM's block-scaled FP8 grouped GEMMs) explain its steps' growth with k."""
    tray = [r for r in rows if r["device"] == "gb200" and r["ep"] == 4]
    print("\nGB200, EP 4 (FastAFD's FFN tray), every kernel: latency slope, ns a token a layer")
    print("| framework | kernel source | dtype | 256-2048 tokens | 4K-16K tokens |")
    print("|---|---|---|---|---|")
    for r in sorted(tray, key=lambda r: (r["framework"], r["version"], r["kernel_source"])):
        decode = r["decode_slope_ms_per_token"]
        print(
            f"| {r['framework']} {r['version']} | {r['kernel_source']} | {r['dtype']} | "
            f"{'-' if decode is None else f'{decode * 1e6:.1f}'} | "
            f"{r['slope_ms_per_token'] * 1e6:.1f} |"
        )
    moe_flops = Efficiency().moe_flops
    ours = gpu_flops_per_token(4) / (moe_flops * load_hardware("gb200").fp8_flops) * 1e9
    print(f"the roofline's default (moe_flops {moe_flops}): {ours:.1f} ns a token a layer")


if __name__ == "__main__":
    sys.exit(main())
