"""End-to-end output tokens per second: multi-process AFD (1A1F, 2A1F) against the aggregated
engine in one process, on the same model and prompts.

N requests, prompt lengths uniform in [16, 256], max_tokens uniform in [16, 128] (seeded), EOS
ignored. Worker processes use `--worker-threads` torch threads each (default 1) and are pinned
to cores with --pin; the aggregated engine uses --threads. Every run's tokens are checked to be
identical to the aggregated run's.

    python benchmarks/bench_afd_e2e.py --model builtin:small-qwen3-moe --transport shm
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="builtin:small-qwen3-moe")
    ap.add_argument("--transport", default="shm")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument(
        "--threads", type=int, default=2, help="torch threads of the one-process aggregated run"
    )
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--pin", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (every engine and worker)")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from afdserve import LLM, SamplingParams

    g = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(16, 257, (args.num_requests,), generator=g).tolist()
    outs = torch.randint(16, 129, (args.num_requests,), generator=g).tolist()
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outs]
    total = sum(outs)
    print(
        f"{args.model}: {args.num_requests} requests, {sum(lens)} prompt tokens, {total} output tokens; "
        f"{os.cpu_count()} cores, torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name(0)})" if args.device != "cpu" else "")
    )
    runs = [("aggregated, 1 process", dict(mode="aggregated", attention_workers=1, microbatches=1))]
    for r in (1, 2):
        runs.append(
            (
                f"AFD {r}A1F over {args.transport}, M={args.microbatches}",
                dict(
                    mode="afd",
                    attention_workers=r,
                    microbatches=args.microbatches,
                    transport=args.transport,
                    worker_threads=args.worker_threads,
                    pin_workers=args.pin,
                ),
            )
        )
    ref = None
    print(f"{'engine':36s} {'seconds':>8s} {'out tok/s':>10s} {'vs aggregated':>14s}")
    base = None
    for name, opts in runs:
        with LLM(
            args.model, max_num_batched_tokens=4096, device=args.device, dtype=args.dtype, **opts
        ) as llm:
            llm.generate(prompts[:2], params[:2])  # warm-up
            t0 = time.perf_counter()
            got = [o.token_ids for o in llm.generate(prompts, params)]
            dt = time.perf_counter() - t0
        ref = ref or got
        assert got == ref, f"{name}: tokens differ from the aggregated run"
        base = base or dt
        print(f"{name:36s} {dt:8.2f} {total / dt:10.1f} {base / dt:13.2f}x")


if __name__ == "__main__":
    main()
