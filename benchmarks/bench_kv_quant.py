"""KV quantisation (issue 19): what int8 and fp8 KV do to quality and to capacity on a real model.

Quality, against full-precision KV (`--kv-cache-dtype auto`, the model dtype) on the same engine
(aggregated, one worker, the exact mode so every number is deterministic):
- teacher forcing: the fixed English TEXT below is scored as a prompt (`prompt_logprobs`); per
  prompt token, |logprob(quantised KV) - logprob(full KV)| of the text's own token, its mean
  and maximum, and how often the most likely next token (rank 1) is the same;
- generation: greedy continuations of GEN_TOKENS tokens from PROMPTS cut points of the text
  (ignore_eos); the share of positions whose token equals full KV's, and the tokens before the
  first difference (after one, the two continuations condition on different text).
Capacity: KV blocks (block_size tokens) a KV_GIB budget holds for each KV dtype, and the
sequences of CONTEXT tokens that fit at once (the engine's own sizing, launch/local.py).
Scale granularity: the model's own K and V rows over TEXT (recorded at every layer's attention)
quantised with afdserve's scale per token and KV head, and with one scale per block of
block_size tokens and KV head instead, (int8) with a zero point per token and head as well, or
with one scale per half row: the relative round-trip error ||x' - x|| / ||x|| over all rows, for
K and V, and the teacher-forced |logprob difference| with K and V so rounded as they are written
(why kv_quant.py scales per token and head, symmetrically).

    python benchmarks/bench_kv_quant.py [--model builtin:smollm2-135m-instruct] [--dtype auto]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TEXT = (
    "The lighthouse keeper kept a notebook in which he wrote down the weather three times a "
    "day. In the morning he noted the direction of the wind, the colour of the sky over the "
    "eastern cliffs and the height of the swell as it broke against the rocks below the tower. "
    "At noon he climbed the narrow stair to clean the great lens, which had been ground by hand "
    "in a workshop far inland more than a century before, and he wrote down whether any ships "
    "had passed. In the evening, before he lit the lamp, he wrote a few lines about nothing in "
    "particular: a gull that had learned to take bread from his hand, the smell of the kelp "
    "after a storm, the letter from his sister that had arrived with the supply boat and that he "
    "had read so often the paper had gone soft at the folds.\n\n"
    "Years later, when the light was automated and the keeper had moved to a small house in the "
    "village, a historian asked to borrow the notebooks. She expected a record of shipwrecks and "
    "rescues, and there were a few of those, told in the same plain hand as everything else. "
    "What she found instead was a careful account of how a single place changes over forty "
    "years: the winters growing milder, the fishing boats growing fewer and larger, the path to "
    "the tower worn a little deeper each season by the keeper's own boots. She wrote to him to "
    "say that the notebooks were the most valuable thing she had read in a long time. He wrote "
    "back that he was glad, but that he had only been paying attention, which anyone could do, "
    "and that the gull, he was sorry to report, had not been seen since the spring."
)
"""Original prose written for this benchmark (a few hundred tokens of plain English)."""
GEN_TOKENS = 96
PROMPT_CUTS = (0.25, 0.5, 0.75, 1.0)
"""Generation prompts: the first 25%, 50%, 75% and all of TEXT's tokens."""
KV_GIB = 1.0
CONTEXT = 4096
QUANT = ("int8", "fp8")


def _engine(model: str, dtype: str, kv: str):
    from afdserve import LLM

    return LLM(
        model,
        mode="aggregated",
        attention_workers=1,
        microbatches=1,
        dtype=dtype,
        kv_cache_dtype=kv,
        batch_invariant=True,
        max_model_len=2048,
        max_num_seqs=8,
    )


def _run(model: str, dtype: str, kv: str, text_ids: list[int]) -> dict:
    from afdserve import SamplingParams

    with _engine(model, dtype, kv) as llm:
        t0 = time.perf_counter()
        scored = llm.generate(
            [text_ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
        )[0]
        t_score = time.perf_counter() - t0
        prompts = [text_ids[: max(8, int(len(text_ids) * c))] for c in PROMPT_CUTS]
        t0 = time.perf_counter()
        gens = llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=GEN_TOKENS, ignore_eos=True)
        )
        t_gen = time.perf_counter() - t0
    own, top = [], []
    for tok, entry in zip(text_ids[1:], scored.prompt_logprobs[1:], strict=True):
        own.append(entry[tok].logprob)
        top.append(next(t for t, lp in entry.items() if lp.rank == 1))
    return dict(own=own, top=top, gens=[g.token_ids for g in gens], t_score=t_score, t_gen=t_gen)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=True):
        if x != y:
            break
        n += 1
    return n


def _kv_rows(model: str, dtype: str, text_ids: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """Every layer's (K, V) [T, Hkv, Dh] for TEXT, as the attention writes them."""
    from afdserve import SamplingParams
    from afdserve.model import layers

    seen: list[tuple[torch.Tensor, ...]] = []
    inner = layers.paged_attention

    def record(q, k, v, *rest):
        seen.append((k.detach().float().clone(), v.detach().float().clone()))
        return inner(q, k, v, *rest)

    layers.paged_attention = record
    try:
        with _engine(model, dtype, "auto") as llm:
            llm.generate([text_ids], SamplingParams(temperature=0, max_tokens=1))
    finally:
        layers.paged_attention = inner
    return [kv for kv in seen if kv[0].shape[0] == len(text_ids)]  # the prefill's, per layer


def _round_trip(x: torch.Tensor, scheme: str, block: int) -> torch.Tensor:
    """Rows x [T, Hkv, Dh] (positions 0..T-1 of one sequence) through int8 or fp8 under
    `scheme`, back in float32: `token` afdserve's (one scale per token and head), `block` one
    scale per `block` positions and head, `zero` (int8) a zero point per token and head too,
    `half` (int8) one scale per half row (two groups of Dh / 2)."""
    from afdserve.model.kv_quant import FORMATS, dequantize, quantize

    name, _, how = scheme.partition(" ")
    fmt = FORMATS[name]
    x = x.float().transpose(0, 1)  # [Hkv, T, Dh]
    n_kv, t, dh = x.shape
    if how == "token":
        back = dequantize(*quantize(x, fmt), fmt, torch.float32)
    elif how == "block":
        xb = torch.cat([x, x.new_zeros(n_kv, -t % block, dh)], 1).reshape(n_kv, -1, block * dh)
        back = dequantize(*quantize(xb, fmt), fmt, torch.float32).reshape(n_kv, -1, dh)[:, :t]
    elif how == "half":
        xh = x.reshape(n_kv, t, 2, dh // 2)
        back = dequantize(*quantize(xh, fmt), fmt, torch.float32).reshape(n_kv, t, dh)
    else:  # zero
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        step = (hi - lo).clamp_min(2.0**-100) / 255
        back = ((x - lo) / step).round().clamp(0, 255) * step + lo
    return back.transpose(0, 1)


SCHEMES = {
    "int8 token": "token and head (afdserve)",
    "int8 block": "{block}-token block and head",
    "int8 zero": "token and head, + zero point",
    "int8 half": "token, head, half row",
    "fp8 token": "token and head (afdserve)",
    "fp8 block": "{block}-token block and head",
}


def _granularity_errors(rows, block: int) -> dict[str, tuple[float, float]]:
    """scheme -> (K, V) relative round-trip error over every layer's rows."""
    out = {}
    for scheme in SCHEMES:
        errs = []
        for which in (0, 1):
            num = den = 0.0
            for kv in rows:
                x = kv[which]
                num += float((_round_trip(x, scheme, block) - x).pow(2).sum())
                den += float(x.pow(2).sum())
            errs.append((num / den) ** 0.5)
        out[scheme] = (errs[0], errs[1])
    return out


def _scheme_scores(model: str, dtype: str, text_ids: list[int], block: int) -> dict:
    """scheme -> the text's teacher-forced logprobs with K and V rounded by it as they are
    written (into a full-precision cache; the prompt is one prefill chunk, so a block scheme
    sees each block whole). `int8 token` and `fp8 token` read back exactly what an int8 / fp8
    cache holds, so on a float32 model they must reproduce the real runs' figures."""
    from afdserve import SamplingParams
    from afdserve.model import layers

    inner = layers.paged_attention
    out = {}
    for scheme in SCHEMES:

        def rounded(q, k, v, *rest, scheme=scheme):
            k2, v2 = (_round_trip(x, scheme, block).to(x.dtype) for x in (k, v))
            return inner(q, k2, v2, *rest)

        layers.paged_attention = rounded
        try:
            with _engine(model, dtype, "auto") as llm:
                scored = llm.generate(
                    [text_ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
                )[0]
        finally:
            layers.paged_attention = inner
        out[scheme] = [
            e[t].logprob for t, e in zip(text_ids[1:], scored.prompt_logprobs[1:], strict=True)
        ]
    return out


def _capacity(model: str, dtype: str) -> list[tuple[str, int, int, int]]:
    """(kv dtype label, bytes per block, usable blocks, sequences of CONTEXT) under KV_GIB."""
    from afdserve.config import EngineConfig
    from afdserve.engine.kv_cache import KVCache
    from afdserve.launch.local import cache_and_scheduler_configs, resolve_dtype
    from afdserve.model.builtin import resolve_model
    from afdserve.model.config import ModelConfig

    config = ModelConfig.from_dir(resolve_model(model))
    rows = []
    for label, model_dtype, kv in (
        ("float32", "float32", "auto"),
        ("bfloat16", "bfloat16", "auto"),
        ("int8", dtype, "int8"),
        ("fp8", dtype, "fp8"),
    ):
        cfg = EngineConfig(
            model=model,
            dtype=model_dtype,
            kv_cache_dtype=kv,
            kv_cache_gib=KV_GIB,
            max_model_len=CONTEXT,
            max_num_seqs=100_000,  # the budget, not the slots, decides
        )
        tdtype = resolve_dtype(model_dtype, config)
        cache, sched = cache_and_scheduler_configs(cfg, config, tdtype)
        per_block = KVCache.bytes_per_block(config, cache.block_size, tdtype, kv)
        seqs = cache.num_usable_blocks // cache.blocks_for(sched.max_model_len)
        rows.append((label, per_block, cache.num_usable_blocks, seqs))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto", help="model dtype (full-precision KV is this)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from afdserve.model.builtin import resolve_model
    from afdserve.model.config import ModelConfig
    from afdserve.model.tokenizer import load_tokenizer

    path = resolve_model(args.model)
    tok = load_tokenizer(path, ModelConfig.from_dir(path).vocab_size)
    text_ids = tok.encode(TEXT)
    print(f"model {args.model}, dtype {args.dtype}, torch {torch.__version__}, "
          f"{args.threads} threads, exact mode, aggregated")  # fmt: skip
    print(f"text: {len(text_ids)} tokens; generation: {len(PROMPT_CUTS)} prompts x "
          f"{GEN_TOKENS} greedy tokens")  # fmt: skip
    ref = _run(args.model, args.dtype, "auto", text_ids)
    print(f"\nfull-precision KV: scoring {ref['t_score']:.1f} s, generation {ref['t_gen']:.1f} s")
    print(f"\n{'KV':<6} {'mean|dlogprob|':>14} {'max|dlogprob|':>13} {'top-1 agree':>11} "
          f"{'gen tokens agree':>16} {'tokens before 1st diff (per prompt)':>36}")  # fmt: skip
    n_gen = len(PROMPT_CUTS) * GEN_TOKENS
    for kv in QUANT:
        got = _run(args.model, args.dtype, kv, text_ids)
        diffs = [abs(a - b) for a, b in zip(got["own"], ref["own"], strict=True)]
        top = sum(a == b for a, b in zip(got["top"], ref["top"], strict=True)) / len(ref["top"])
        same = sum(
            x == y
            for g, r in zip(got["gens"], ref["gens"], strict=True)
            for x, y in zip(g, r, strict=True)
        )
        prefixes = [_common_prefix(g, r) for g, r in zip(got["gens"], ref["gens"], strict=True)]
        print(f"{kv:<6} {statistics.fmean(diffs):>14.4f} {max(diffs):>13.4f} {top:>11.1%} "
              f"{same / n_gen:>16.1%} {str(prefixes):>36}")  # fmt: skip
    print(f"\ncapacity: {KV_GIB} GiB of KV per attention worker, sequences of {CONTEXT} tokens")
    print(f"{'KV':<9} {'bytes/block':>11} {'blocks':>7} {'sequences':>9} {'x fp32':>7} "
          f"{'x bf16':>7}")  # fmt: skip
    rows = _capacity(args.model, args.dtype)
    base = {label: blocks for label, _, blocks, _ in rows}
    for label, per_block, blocks, seqs in rows:
        print(f"{label:<9} {per_block:>11} {blocks:>7} {seqs:>9} "
              f"{blocks / base['float32']:>6.2f}x {blocks / base['bfloat16']:>6.2f}x")  # fmt: skip
    from afdserve.config import EngineConfig

    block = EngineConfig().block_size
    kv_rows = _kv_rows(args.model, args.dtype, text_ids)
    errors = _granularity_errors(kv_rows, block)
    scores = _scheme_scores(args.model, args.dtype, text_ids, block)
    print(f"\nscale granularity ({len(kv_rows)} layers' K and V over TEXT): relative round-trip "
          f"error, and teacher-forced |dlogprob| with K and V so rounded")  # fmt: skip
    print(f"{'KV':<5} {'one scale per':<30} {'K error':>8} {'V error':>8} "
          f"{'mean|dlogprob|':>14} {'max|dlogprob|':>13}")  # fmt: skip
    for scheme, label in SCHEMES.items():
        diffs = [abs(a - b) for a, b in zip(scores[scheme], ref["own"], strict=True)]
        ek, ev = errors[scheme]
        print(f"{scheme.split()[0]:<5} {label.format(block=block):<30} {ek:>8.4f} {ev:>8.4f} "
              f"{statistics.fmean(diffs):>14.4f} {max(diffs):>13.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
