"""The 32-GPU Qwen3-235B-A22B (FP8) search of issue 18: does AFD decode plus a prefill pool
show up beside AFD, colocated and PD? (aiconfigurator 0.12.0, H100, ISL 4000 / OSL 500,
TPOT <= 50 ms, picked 8A + 8F + 16 prefill GPUs at 392 tok/s/GPU, above colocated 318 and PD
356.)

    python benchmarks/bench_search_32gpu.py [--requests 1000] [--hardware h100] [--kv-dtype fp8]
                                            [--json]

The workload is fixed-length: every request has a 4000-token prompt and 500 output tokens,
arriving as a Poisson process (written to a temporary trace file; the search rescales its
rate). TTFT SLO 2000 ms (aiconfigurator's sweep has none; an assumption), TPOT SLO 50 ms.
KV bf16 by default; aiconfigurator's 8 + 8 AFD estimate of issue 18 (B = 1024 slots a bundle at
4.25K tokens) only fits 8 H100s with FP8 KV, so `--kv-dtype fp8` is the like-for-like run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from afdserve.cli import main


def write_trace(path: Path, n: int = 2000, seed: int = 0) -> None:
    t = np.cumsum(np.random.default_rng(seed).exponential(0.1, n))
    rows = "\n".join(f"{x:.6f},4000,500" for x in t)
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + rows + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--hardware", default="h100")
    ap.add_argument("--kv-dtype", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "isl4000_osl500.csv"
        write_trace(trace)
        argv = ["simulate", "--model", "qwen3-235b-a22b", "--weight-dtype", "fp8"]
        argv += ["--hardware", args.hardware, "--gpus", "32", "--workload", str(trace)]
        argv += ["--ttft-slo-ms", "2000", "--tpot-slo-ms", "50", "--quiet"]
        argv += ["--kv-dtype", args.kv_dtype]
        argv += ["--requests", str(args.requests)] + (["--json"] if args.json else [])
        sys.exit(main(argv))
