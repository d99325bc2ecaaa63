"""Output tokens per second: afdserve (aggregated, and AFD r=2) against HF transformers `generate`.

Same model, same torch threads, same prompts: N requests with prompt lengths uniform in
[16, 512] and max_tokens uniform in [16, 256] (seeded), EOS ignored so every request produces
exactly max_tokens tokens. HF runs static batches (left-padded, sorted by length to help it) with
max_new_tokens = the batch's largest max_tokens; only each request's own max_tokens count as
output. afdserve runs continuous batching over all requests at once.

    python benchmarks/bench_engine_vs_hf.py --model builtin:small-qwen3-moe --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def workload(n: int, seed: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(16, 513, (n,), generator=g).tolist()
    outs = torch.randint(16, 257, (n,), generator=g).tolist()
    prompts = [torch.randint(0, 256, (k,), generator=g).tolist() for k in lens]  # byte tokens
    assert max(max(p) for p in prompts) < vocab
    return prompts, outs


def run_hf(path, prompts, max_tokens, batch_size: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    order = sorted(range(len(prompts)), key=lambda i: (max_tokens[i], len(prompts[i])))
    t0 = time.perf_counter()
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        new = max(max_tokens[i] for i in idx)
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
    return time.perf_counter() - t0


def run_ours(path, prompts, max_tokens, **engine) -> tuple[float, list[list[int]]]:
    from afdserve import LLM, SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    with LLM(str(path), dtype="float32", max_num_batched_tokens=4096, **engine) as llm:
        llm.generate(prompts[:2], params[:2])  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        return time.perf_counter() - t0, [o.token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="builtin:small-qwen3-moe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from afdserve.model.builtin import resolve_model
    from afdserve.model.config import ModelConfig

    path = resolve_model(args.model)
    cfg = ModelConfig.from_dir(path)
    prompts, max_tokens = workload(args.num_requests, args.seed, cfg.vocab_size)
    total = sum(max_tokens)
    print(
        f"model {args.model} ({cfg.architecture}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}); "
        f"{len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, {total} output tokens; "
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}"
    )
    rows = []
    t_agg, agg = run_ours(
        path, prompts, max_tokens, mode="aggregated", attention_workers=1, microbatches=1
    )
    rows.append(("afdserve aggregated", t_agg))
    t_afd, afd = run_ours(
        path, prompts, max_tokens, mode="afd", attention_workers=2, microbatches=2
    )
    rows.append(("afdserve AFD 2A1F, M=2", t_afd))
    assert afd == agg, "AFD output differs from aggregated"
    t_hf = run_hf(path, prompts, max_tokens, args.hf_batch_size)
    rows.append((f"HF transformers generate (batch {args.hf_batch_size})", t_hf))
    print(f"{'engine':40s} {'seconds':>8s} {'out tok/s':>10s} {'vs HF':>6s}")
    for name, t in rows:
        print(f"{name:40s} {t:8.2f} {total / t:10.1f} {t_hf / t:5.2f}x")


if __name__ == "__main__":
    main()
