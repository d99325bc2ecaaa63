"""Expert parallelism over m FFN workers: balance with and without EPLB, the FFN tier's time
against m on the same total threads, and what the dispatch costs per layer.

    python benchmarks/bench_expert_parallel.py [--requests 16] [--max-tokens 24]

1. Balance: a MoE model with a skewed router (`make-model --router-skew 1`: two of 16 experts
   in every token's top-4) served 2A:2F in-process in the exact mode, once with the static
   placement and once with `--eplb` (window 8 reports, re-placement every 8, 2 redundant
   slots). Prints each FFN worker's share of the (token, slot) pairs over the whole run (from
   the engine's own expert-load counts under the final placement), the worst layer's max/mean
   on the EPLB window before and after the re-placement, and whether the tokens are the same.
2. FFN tier against m: one MoE layer of that model on a decode batch of T tokens: m = 1 runs
   all experts with the machine's N threads; m = N runs N expert shards concurrently with 1
   thread each (the same total threads), as N processes (as FFN worker processes run) and as
   N threads of one process. Median of repeats, milliseconds; no transport.
3. Dispatch: per MoE layer and decode batch, the bytes each attention worker sends (rows,
   ROUTING tables) and receives (one row per pair) with m = 1 and m = 2, and the attention-side
   time of routing, planning and combining (ExpertDispatcher.plan + gather) against m = 1's
   plain send.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from afdserve import LLM, SamplingParams
from afdserve.afd.expert_dispatch import ExpertDispatcher
from afdserve.eplb.placement import Placement
from afdserve.launch.local import load_model
from afdserve.model.experts import token_pairs
from afdserve.model.kernels import Kernels
from afdserve.model.make_model import make_model
from afdserve.model.parts import RouterPart


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(3, 250, (int(k),), generator=g).tolist()
        for k in torch.randint(8, 96, (n,), generator=g)
    ]


def balance(model: Path, requests: int, max_tokens: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    runs = {}
    for name, extra in (
        ("static", {}),
        (
            "eplb",
            dict(eplb=True, eplb_window_size=8, eplb_step_interval=8, num_redundant_experts=2),
        ),
    ):
        llm = LLM(
            str(model),
            mode="afd",
            attention_workers=2,
            ffn_workers=2,
            microbatches=2,
            batch_invariant=True,
            **extra,
        )
        try:
            t0 = time.perf_counter()
            outs = llm.generate(_prompts(requests), params)
            wall = time.perf_counter() - t0
            st = llm.engine.state()
            rows = [int(sum(h.sum for h in s.ffn_batch_tokens.values())) for s in st.ffn]
            runs[name] = ([o.token_ids for o in outs], st.experts, rows, wall)
        finally:
            llm.close()
    same = runs["static"][0] == runs["eplb"][0]
    print(f"== balance: 2A:2F, {requests} requests x {max_tokens} tokens, exact mode ==")
    for name, (_, ex, rows, wall) in runs.items():
        worst = max(v for v in ex.imbalance if v is not None)
        print(
            f"{name:>6}: placement v{ex.placement_version}, window max/mean (worst layer) "
            f"{worst:.3f}; token rows sent to each FFN worker {rows}; wall {wall:.1f} s"
        )
        for version, before, after in ex.history:
            print(
                f"        re-placement v{version}: worst-layer max/mean {before:.3f} -> {after:.3f}"
            )
    print(runs["eplb"][1].placement)
    print(f"tokens identical with and without EPLB: {same}")


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def ffn_tier(model: Path, tokens: int, repeats: int) -> None:
    threads = torch.get_num_threads()
    m = load_model(str(model), "float32", "cpu", ("ffn", "router"), Kernels())
    layer = 0
    moe = m.ffn.layers[layer].mlp
    x = torch.randn(tokens, m.config.hidden_size, generator=torch.Generator().manual_seed(1))
    _, weights, experts = m.router.route(layer, x)
    rows, ids = token_pairs(experts)
    full = moe.experts

    def one():
        full.run(x, rows, ids)

    t1 = _time(one, repeats)
    shards = Placement.static([True], m.config.num_experts, threads)
    sets = [full.subset(shards.experts_of(0, w)) for w in range(threads)]
    picks = [torch.isin(ids, torch.tensor(s.ids)) for s in sets]

    def many():
        def work(s, p):
            torch.set_num_threads(1)
            s.run(x, rows[p], ids[p])

        ts = [threading.Thread(target=work, args=(s, p)) for s, p in zip(sets, picks, strict=True)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    tm_threads = _time(many, repeats)
    torch.set_num_threads(threads)
    tm_procs = _in_processes(sets, picks, x, rows, ids, repeats)
    print(f"== FFN tier: one MoE layer, {tokens} tokens, {threads} threads in all ==")
    print(f"m = 1 ({threads} threads): {t1:.2f} ms")
    print(
        f"m = {threads} shards, 1 thread each: {tm_procs:.2f} ms as {threads} processes "
        f"(the slowest shard's median), {tm_threads:.2f} ms as threads of one process"
    )


def _in_processes(sets, picks, x, rows, ids, repeats: int) -> float:
    """Each shard in its own forked process with 1 thread, all timed concurrently (a barrier
    before each repeat); the slowest shard's median, ms."""
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(len(sets)), ctx.Queue()

    def work(s, p):
        torch.set_num_threads(1)
        r, i = rows[p], ids[p]
        s.run(x, r, i)
        ts = []
        for _ in range(repeats):
            barrier.wait()
            t0 = time.perf_counter()
            s.run(x, r, i)
            ts.append(time.perf_counter() - t0)
        out.put(statistics.median(ts) * 1e3)

    procs = [ctx.Process(target=work, args=(s, p)) for s, p in zip(sets, picks, strict=True)]
    for pr in procs:
        pr.start()
    medians = [out.get(timeout=300) for _ in procs]
    for pr in procs:
        pr.join(timeout=60)
    return max(medians)


def dispatch(model: Path, tokens: int, repeats: int) -> None:
    m = load_model(str(model), "float32", "cpu", ("ffn",), Kernels())
    router = RouterPart.of(m.ffn)
    c = m.config
    d = c.hidden_size
    h = torch.randn(tokens, d, generator=torch.Generator().manual_seed(2))
    placement = Placement.static(
        [c.is_moe_layer(i) for i in range(c.num_hidden_layers)], c.num_experts, 2
    )
    disp = ExpertDispatcher(0, 2, router, placement)
    sends, plan = disp.plan(0, h)
    sent = sum(s.x.nbytes + s.routing.nbytes for s in sends)
    back = sum(p.numel() for p in plan.places) * d * 4
    one_way = tokens * d * 4
    fanout = sum(s.x.shape[0] for s in sends) / tokens
    print(
        f"== dispatch: one MoE layer, {tokens} tokens, top-{c.num_experts_per_tok} of {c.num_experts} =="
    )
    print(f"m = 1: sends {one_way} B, receives {one_way} B")
    print(
        f"m = 2: sends {sent} B (rows {sum(s.x.nbytes for s in sends)} + ROUTING "
        f"{sum(s.routing.nbytes for s in sends)}), receives {back} B (one row per pair); "
        f"mean FFN workers per token {fanout:.2f}"
    )
    replies = [torch.randn(p.numel(), d) for p in plan.places]

    def ep():
        _, p = disp.plan(0, h)
        disp.gather(p, replies, h)

    t_ep = _time(ep, repeats)
    print(f"attention-side route + plan + combine at m = 2: {t_ep:.3f} ms per layer (m = 1: none)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=64, help="decode batch of parts 2 and 3")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model("qwen3-moe", "small", 0, Path(tmp) / "skewed", router_skew=1.0)
        balance(model, args.requests, args.max_tokens)
        ffn_tier(model, args.tokens, args.repeats)
        dispatch(model, args.tokens, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
