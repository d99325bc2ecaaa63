"""AFD decode step against aiconfigurator's AFD estimate, side by side in one run (issue 18).

    python benchmarks/bench_vs_aiconfigurator.py --install-aiconfigurator   # once: its venv
    python benchmarks/bench_vs_aiconfigurator.py [--json]

aiconfigurator (NVIDIA Dynamo's deployment estimator, 0.12.0 on PyPI, Apache-2.0) is a benchmark
peer, never a dependency: it lives in its own venv (`--aic-venv`, default .bench/aic-venv) and
runs as a subprocess, `aiconfigurator cli estimate --estimate-mode afd` with the trtllm backend
and its op-level perf database for the system. Skipped with one line where the venv is missing.

Each point is one AFD decode deployment: `a_nodes` attention nodes of 8 GPUs, one attention
worker (data-parallel, TP 1) per GPU with B slots, one FFN node of 8 GPUs (expert parallel
8), M ping-pong microbatches, ISL 4000 / OSL 500. Ours is the same bundle in afdserve's roofline
with the documented default efficiencies (`Efficiency()`, never tuned per case), FP8 weights,
FP8 KV (what aiconfigurator infers for the FP8 checkpoint: its attention memory of 63.8 GB at
B = 128 only fits with it), context ISL + OSL / 2 per slot (mean field), the link the
deployment's size gives (the NICs between nodes), timed by the simulator's exact microbatch
pipeline (`afdserve.sim.published.Bundle`). Printed: each side's step (TPOT) and throughput per
GPU and the error (ours / theirs - 1), and both sides' per-layer, per-microbatch stage times
(attention, FFN, one-way transfer).

A second table puts aiconfigurator beside a measurement: five points of FastAFD's A:F sweep
(Qwen3-235B-A22B-FP8 on GB200 NVL72, k attention trays of 4 one-worker GPUs, one 4-GPU FFN tray,
b slots a worker, bf16 KV, 16 output tokens, 2 microbatches; `afdserve/sim/data/`), with
aiconfigurator's `gb200` system and ours (`afdserve.sim.published.fastafd_bundle`).

A third table holds our hardware catalog against aiconfigurator's system files (peak FLOP/s,
memory, bandwidth, links per GPU and direction) for the devices both describe.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from afdserve.planner.hardware_catalog import load_hardware
from afdserve.planner.model_catalog import load_model
from afdserve.planner.ratio import stage_times
from afdserve.planner.roofline import Efficiency
from afdserve.sim.published import Bundle, fastafd_bundle, load_data

ROOT = Path(__file__).resolve().parents[1]
AIC_VERSION = "0.12.0"
ISL, OSL = 4000, 500
GPUS_PER_NODE = 8
POINTS = [  # (attention nodes, slots per attention worker, microbatches)
    (1, 32, 2),
    (1, 64, 2),
    (1, 128, 2),
    (1, 128, 3),
    (2, 64, 2),
    (2, 128, 2),
]
SYSTEMS = {"h100": "h100_sxm", "h200": "h200_sxm", "a100": "a100_sxm", "b200": "b200_sxm",
           "gb200": "gb200"}  # fmt: skip
DUMP_SYSTEMS = """
import json, pathlib, sys, yaml, aiconfigurator_core
root = pathlib.Path(aiconfigurator_core.__file__).parent / "systems"
print(json.dumps({n: yaml.safe_load((root / f"{n}.yaml").read_text()) for n in sys.argv[1:]}))
"""
FASTAFD_POINTS = [(16384, 4), (16384, 8), (16384, 14), (65536, 3), (65536, 14)]  # (ISL, k)
FIELDS = {
    "t_a_layer": r"T_a_layer:\s+([\d.]+) ms",
    "t_f_layer": r"T_f_layer:\s+([\d.]+) ms",
    "t_a2f_layer": r"T_a2f_layer:\s+([\d.]+) ms",
    "tpot_ms": r"TPOT:\s+([\d.]+) ms",
    "tps_per_gpu": r"tokens/s/gpu:\s+([\d,.]+)",
    "a_memory_gb": r"\(a\) Memory:\s+([\d.]+) GB",
}


def install_aiconfigurator(venv: Path) -> None:
    """aiconfigurator in its own venv, beside (never inside) afdserve's."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"aiconfigurator=={AIC_VERSION}"], check=True)


def aic_estimate(
    venv: Path,
    a_nodes: int,
    batch: int,
    microbatches: int,
    *,
    system: str = "h100_sxm",
    gpus_per_node: int = GPUS_PER_NODE,
    isl: int = ISL,
    osl: int = OSL,
    kv: str | None = None,
) -> dict[str, float]:
    """aiconfigurator's AFD decode estimate of one point, parsed from its report (`kv`: its
    --kvcache-quant-mode; None lets it infer one from the checkpoint)."""
    cmd = [str(venv / "bin" / "aiconfigurator"), "cli", "estimate"]
    cmd += ["--model", "Qwen/Qwen3-235B-A22B-FP8", "--system", system]
    cmd += ["--backend", "trtllm", "--estimate-mode", "afd", "--no-afd-combined-with-pd"]
    cmd += ["--isl", str(isl), "--osl", str(osl), "--n-a-nodes", str(a_nodes), "--n-f-nodes", "1"]
    cmd += ["--f-moe-ep-size", str(gpus_per_node), "--a-batch-size", str(batch)]
    cmd += ["--num-microbatches", str(microbatches), "--log-level", "ERROR"]
    cmd += [] if kv is None else ["--kvcache-quant-mode", kv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    found = {k: re.search(p, out) for k, p in FIELDS.items()}
    if proc.returncode != 0 or not all(found.values()):
        tail = "\n".join(out.strip().splitlines()[-5:])
        raise RuntimeError(f"aiconfigurator failed (rc {proc.returncode}):\n{tail}")
    return {k: float(m.group(1).replace(",", "")) for k, m in found.items() if m}


def fastafd_rows(venv: Path) -> list[dict]:
    """Measured (FastAFD), aiconfigurator and ours for a few points of the sweep."""
    data = load_data("fastafd_ratio_sweep")
    rows = []
    for isl, k in FASTAFD_POINTS:
        point = next(p for p in data["points"] if p["isl"] == isl and p["attention_trays"] == k)
        bundle = fastafd_bundle(data, point, Efficiency())
        gpn = int(data["gpus_per_tray"])
        aic = aic_estimate(
            venv,
            k,
            int(point["batch_per_worker"]),
            int(data["microbatches"]),
            system="gb200",
            gpus_per_node=gpn,
            isl=isl,
            osl=16,
            kv="bfloat16",
        )
        rows.append(
            {
                "isl": isl,
                "attention_trays": k,
                "batch": int(point["batch_per_worker"]),
                "measured_step_ms": point["step_ms"],
                "aiconfigurator": aic,
                "afdserve_step_ms": bundle.sim_step_ms(),
            }
        )
    return rows


def run_in_aic_venv(venv: Path, code: str, *args: str, timeout: int = 120) -> object:
    """`code` run by the aiconfigurator venv's Python with `args`; what it prints, as JSON."""
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"aiconfigurator's venv failed: {proc.stderr[-800:]}")
    return json.loads(proc.stdout)


def catalog_rows(venv: Path) -> list[dict]:
    """Our catalog's figures beside aiconfigurator's system files, per device."""
    theirs = run_in_aic_venv(venv, DUMP_SYSTEMS, *SYSTEMS.values())
    rows = []
    for ours_name, aic_name in SYSTEMS.items():
        hw, sysd = load_hardware(ours_name), theirs[aic_name]
        gpu, node = sysd["gpu"], sysd["node"]
        rows.append(
            {
                "device": ours_name,
                "bf16_tflops": (hw.bf16_flops / 1e12, gpu["bfloat16_tc_flops"] / 1e12),
                "fp8_tflops": (
                    (hw.fp8_flops or 0) / 1e12,
                    gpu.get("fp8_tc_flops", 0) / 1e12,
                ),
                "memory_gb": (hw.memory_bytes / 1e9, gpu["mem_capacity"] / 1e9),
                "memory_tb_s": (hw.memory_bw / 1e12, gpu["mem_bw"] / 1e12),
                "scale_up_gb_s": (hw.scale_up_bw / 1e9, node["intra_node_bw"] / 1e9),
                "scale_out_gb_s": (hw.scale_out_bw / 1e9, node["inter_node_bw"] / 1e9),
                "gpus_per_node": (hw.scale_up_domain, node["num_gpus_per_node"]),
                "aic_mem_bw_scaling": gpu.get("mem_bw_empirical_scaling_factor"),
            }
        )
    return rows


def ours(a_nodes: int, batch: int, microbatches: int) -> dict[str, float]:
    bundle = Bundle(
        model=load_model("qwen3-235b-a22b", "fp8"),
        hardware=load_hardware("h100"),
        ratio=a_nodes * GPUS_PER_NODE,
        attention_devices=1,
        ffn_devices=GPUS_PER_NODE,
        batch=batch,
        context=ISL + OSL / 2,
        kv_dtype="fp8",
        microbatches=microbatches,
    )
    step = bundle.sim_step_ms()
    costs = bundle.costs()
    slots = batch / microbatches  # per microbatch and worker
    per_mb = stage_times(costs, batch, bundle.context, bundle.ratio, microbatches)
    return {
        "tpot_ms": step,
        "tps_per_gpu": bundle.tps_per_gpu(step),
        "t_a_layer": costs.t_attention(slots * bundle.context),
        "t_f_layer": costs.t_ffn(bundle.ratio * slots),
        "t_a2f_layer": costs.t_comm_for(slots, bundle.ratio),
        "plan_step_ms": costs.num_layers * per_mb.cycle,
        "fits": float(bundle.fits()),
        "link": bundle.link,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--aic-venv", default=str(ROOT / ".bench" / "aic-venv"))
    ap.add_argument("--install-aiconfigurator", action="store_true", help="create its venv, exit")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    venv = Path(args.aic_venv)
    if args.install_aiconfigurator:
        install_aiconfigurator(venv)
        print(f"aiconfigurator {AIC_VERSION} installed in {venv}")
        return 0
    if not (venv / "bin" / "aiconfigurator").exists():
        print(f"aiconfigurator: skipped, no venv at {venv} (--install-aiconfigurator)")
        return 0
    rows = []
    for a_nodes, batch, m in POINTS:
        rows.append(
            {
                "a_nodes": a_nodes,
                "batch": batch,
                "microbatches": m,
                "aiconfigurator": aic_estimate(venv, a_nodes, batch, m),
                "afdserve": ours(a_nodes, batch, m),
            }
        )
    fast = fastafd_rows(venv)
    systems = catalog_rows(venv)
    if args.json:
        print(json.dumps({"h100_afd": rows, "fastafd": fast, "systems": systems}, indent=2))
        return 0
    print(
        f"Qwen3-235B-A22B-FP8 AFD decode on H100, ISL {ISL} / OSL {OSL}, 8-GPU attention nodes "
        f"(one worker per GPU) + one 8-GPU FFN node; aiconfigurator {AIC_VERSION} (trtllm) vs "
        "afdserve (roofline, default efficiencies, simulator's pipeline)"
    )
    print(
        "| A nodes | B/worker | M | TPOT ms: aic / ours (err) | tok/s/GPU: aic / ours (err) "
        "| per-layer, per-microbatch A / F / A->F ms: aic | ours |"
    )
    print("|---|---|---|---|---|---|---|")
    errs = []
    for r in rows:
        a, o = r["aiconfigurator"], r["afdserve"]
        e_t, e_s = o["tpot_ms"] / a["tpot_ms"] - 1, o["tps_per_gpu"] / a["tps_per_gpu"] - 1
        errs.append(abs(e_s))
        stages = "{t_a_layer:.3f} / {t_f_layer:.3f} / {t_a2f_layer:.3f}"
        print(
            f"| {r['a_nodes']} | {r['batch']} | {r['microbatches']} "
            f"| {a['tpot_ms']:.1f} / {o['tpot_ms']:.1f} ({e_t:+.1%}) "
            f"| {a['tps_per_gpu']:,.0f} / {o['tps_per_gpu']:,.0f} ({e_s:+.1%}) "
            f"| {stages.format(**a)} | {stages.format(**o)} |"
        )
    print(f"median |error| of throughput per GPU: {statistics.median(errs):.1%}")
    print()
    print(
        "FastAFD measured (GB200 NVL72, 4-GPU trays, bf16 KV, M = 2) vs aiconfigurator "
        "(gb200, trtllm) vs afdserve; error = predicted / measured - 1"
    )
    print(
        "| ISL | k trays | b | measured step ms | aic step ms (err) | ours (err) | aic A / F per layer-mb |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in fast:
        m, a = r["measured_step_ms"], r["aiconfigurator"]
        print(
            f"| {r['isl'] // 1024}K | {r['attention_trays']} | {r['batch']} | {m:.2f} "
            f"| {a['tpot_ms']:.2f} ({a['tpot_ms'] / m - 1:+.1%}) "
            f"| {r['afdserve_step_ms']:.2f} ({r['afdserve_step_ms'] / m - 1:+.1%}) "
            f"| {a['t_a_layer']:.3f} / {a['t_f_layer']:.3f} |"
        )
    print()
    print("Hardware catalog: ours / aiconfigurator's system file (per GPU, links per direction)")
    cols = ("bf16_tflops", "fp8_tflops", "memory_gb", "memory_tb_s", "scale_up_gb_s")
    print("| device | " + " | ".join(cols) + " | scale_out_gb_s | GPUs per node / domain |")
    print("|---|" + "---|" * (len(cols) + 2))
    for r in systems:
        cells = " | ".join(f"{r[c][0]:,.4g} / {r[c][1]:,.4g}" for c in (*cols, "scale_out_gb_s"))
        print(f"| {r['device']} | {cells} | {r['gpus_per_node'][0]} / {r['gpus_per_node'][1]} |")
    scale = {r["aic_mem_bw_scaling"] for r in systems}
    print(f"aiconfigurator's memory-bandwidth scaling factor: {sorted(scale)} (ours: 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
