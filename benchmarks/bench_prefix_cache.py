"""Prefix caching on vs off, in one run: hit rate, prompt tokens not recomputed, throughput, TTFT.

Two workloads, each replayed closed-loop (at most --concurrency requests in flight; the next
one enters when one ends, in workload order) on an in-process AFD engine, once with the prefix
cache and once without; every request's tokens (greedy) are checked to be the same both ways.

- `system-prompt`: N requests, one shared system prompt of --system-tokens tokens followed by a
  user turn of 16-64 unique tokens (seeded).
- `mooncake-conv`: the Mooncake conversation trace (../shared/traces/mooncake_conversation.jsonl,
  Apache-2.0, Moonshot AI / kvcache-ai) at CI size: whole conversations (requests sharing their
  first two hash ids) in order of first appearance until there are N requests, replayed in
  arrival order. (A window of N consecutive requests would hold almost no reuse: the trace's
  follow-up turns come minutes apart. Sampled by conversation, an unbounded cache would hold
  about 40% of the prompt tokens, near the whole trace's 37.4%, afdserve/planner/prefix.py.) Each 512-token hash block becomes --tokens-per-hash tokens drawn from its hash id (so
  equal ids are equal tokens, and a shared hash prefix is a shared token prefix), the prompt
  length is scaled by the same factor (and cut to fit --max-model-len), and outputs are capped
  at --max-output tokens.

TTFT is measured from a request's entry into the engine (closed loop: no queueing ahead of it
at the front) to its first token event. `recomputed` counts tokens fed again after a
preemption, `from host` the blocks brought back from the KV host tier (--host-blocks). --kv-blocks sizes each attention worker's cache
(default: the engine's own sizing); a small one makes eviction and preemption part of the run.

    python benchmarks/bench_prefix_cache.py
    python benchmarks/bench_prefix_cache.py --kv-blocks 64 --host-blocks 1024  # eviction, tier
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

MOONCAKE_BLOCK = 512


def system_prompt_workload(n: int, system_tokens: int, seed: int, vocab: int):
    rng = random.Random(seed)
    system = [rng.randrange(3, vocab) for _ in range(system_tokens)]
    return [
        (system + [rng.randrange(3, vocab) for _ in range(rng.randrange(16, 65))], 16)
        for _ in range(n)
    ]


def mooncake_workload(
    path: Path, n: int, per_hash: int, max_output: int, vocab: int, max_prompt: int
):
    out = []
    with path.open(encoding="utf-8") as f:
        every = sorted((json.loads(line) for line in f if line.strip()), key=_stamp)
    conversations: dict[tuple, list] = {}
    for rec in every:  # a conversation: the requests that share their first two hash ids
        conversations.setdefault(tuple(rec["hash_ids"][:2]), []).append(rec)
    recs: list = []
    for turns in conversations.values():  # whole conversations, by first appearance
        if len(recs) >= n:
            break
        recs += turns
    recs.sort(key=_stamp)  # stable: the trace's arrival order
    for rec in recs:
        tokens: list[int] = []
        for h in rec["hash_ids"]:
            rng = random.Random(h * 7919 + 1)
            tokens += [rng.randrange(3, vocab) for _ in range(per_hash)]
        length = -(-rec["input_length"] * per_hash // MOONCAKE_BLOCK)
        length = max(1, min(len(tokens), length, max_prompt))
        out.append((tokens[:length], max(1, min(max_output, rec["output_length"]))))
    return out


def _stamp(rec: dict) -> float:
    return float(rec["timestamp"])


def replay(engine, workload, concurrency: int):
    """Closed loop; returns (outputs per request, TTFTs, wall seconds, output tokens)."""
    from afdserve import SamplingParams

    pending = list(enumerate(workload))
    started: dict[str, float] = {}
    ttft: list[float] = []
    outs: dict[str, list[int]] = {}
    live = 0
    t0 = time.perf_counter()
    while pending or live:
        while pending and live < concurrency:
            i, (prompt, max_tokens) = pending.pop(0)
            rid = f"r{i}"
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            started[rid] = time.perf_counter()
            engine.add_request(rid, prompt, params)
            outs[rid] = []
            live += 1
        for ev in engine.step():
            if not outs[ev.request_id]:
                ttft.append(time.perf_counter() - started[ev.request_id])
            outs[ev.request_id].append(ev.token_id)
            if ev.finished:
                live -= 1
    wall = time.perf_counter() - t0
    return outs, ttft, wall, sum(len(o) for o in outs.values())


def run(args, workload, caching: bool, host_blocks: int = 0):
    from afdserve.config import EngineConfig
    from afdserve.launch.local import build_engine

    cfg = EngineConfig(
        model=args.model,
        mode="afd",
        attention_workers=args.attention_workers,
        microbatches=2,
        block_size=args.block_size,
        num_kv_blocks=args.kv_blocks,
        max_model_len=args.max_model_len,
        enable_prefix_caching=caching,
        num_host_kv_blocks=host_blocks or None,
    )
    engine, _ = build_engine(cfg)
    try:
        replay(engine, workload[: min(4, len(workload))], args.concurrency)  # warm-up
        for w in engine.workers:  # the measured run starts cold: counters and cache alike
            w.scheduler.allocator.reset()
        before = engine.state(afd=False)
        res = replay(engine, workload, args.concurrency)
        st = engine.state(afd=False)
        diff = {
            k: st.counter(k) - before.counter(k)
            for k in (
                "prefix_cache_queries",
                "prefix_cache_hits",
                "prompt_tokens",
                "preemptions",
                "kv_host_blocks_in",
            )
        }
        diff["recomputed"] = st.counter("recomputed_tokens") - before.counter("recomputed_tokens")
        diff["routing"] = {k: v - before.routing.get(k, 0) for k, v in st.routing.items()}
        return res, diff
    finally:
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="builtin:tiny-qwen3-moe")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--attention-workers", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-blocks", type=int, default=None)
    ap.add_argument(
        "--host-blocks",
        type=int,
        default=0,
        help="also run with a KV host tier of this many blocks per worker (cache on)",
    )
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--tokens-per-hash", type=int, default=32)
    ap.add_argument("--max-output", type=int, default=16)
    ap.add_argument(
        "--trace", type=Path, default=None, help="default: the traces directory's Mooncake file"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("system-prompt", "mooncake-conv"), default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from afdserve.model.builtin import resolve_model
    from afdserve.model.config import ModelConfig
    from afdserve.planner.workload import traces_dir

    vocab = ModelConfig.from_dir(resolve_model(args.model)).vocab_size
    trace = args.trace or traces_dir() / "mooncake_conversation.jsonl"
    workloads = {
        "system-prompt": system_prompt_workload(
            args.requests, args.system_tokens, args.seed, vocab
        ),
        "mooncake-conv": mooncake_workload(
            trace,
            args.requests,
            args.tokens_per_hash,
            args.max_output,
            vocab,
            args.max_model_len - args.max_output,
        ),
    }
    print(
        f"{args.model}, AFD {args.attention_workers}A1F in-process, block {args.block_size}, "
        f"KV blocks/worker {args.kv_blocks or 'auto'}, concurrency {args.concurrency}, "
        f"{args.threads} torch thread(s)"
    )
    head = (
        "| workload | cache | requests | prompt tok | hit rate | tokens not recomputed | "
        "preempt | recomputed | from host | out tok/s | TTFT mean ms | TTFT p90 ms | "
        "routing (load/prefix/balance) |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, wl in workloads.items():
        if args.only and name != args.only:
            continue
        results = {}
        configs = [("off", False, 0), ("on", True, 0)]
        if args.host_blocks:
            configs.append((f"on + host {args.host_blocks}", True, args.host_blocks))
        for label, caching, host in configs:
            (outs, ttft, wall, out_tokens), c = run(args, wl, caching, host)
            results[label] = outs
            q = c["prefix_cache_queries"]
            rate = c["prefix_cache_hits"] / q if q else 0.0
            p90 = statistics.quantiles(ttft, n=10)[-1] if len(ttft) > 1 else ttft[0]
            r = c["routing"]
            print(
                f"| {name} | {label} | {len(wl)} | {c['prompt_tokens']} | "
                f"{rate:.1%} | {c['prefix_cache_hits']} | {c['preemptions']} | "
                f"{c['recomputed']} | {c['kv_host_blocks_in']} | "
                f"{out_tokens / wall:.1f} | {1e3 * statistics.fmean(ttft):.1f} | {1e3 * p90:.1f} | "
                f"{r.get('load', 0)}/{r.get('prefix', 0)}/{r.get('balance', 0)} |"
            )
        same = all(o == results["off"] for o in results.values())
        print(f"<!-- {name}: outputs with the cache equal outputs without: {same} -->")
        if not same:
            raise SystemExit(f"{name}: outputs differ with the prefix cache")


if __name__ == "__main__":
    main()
