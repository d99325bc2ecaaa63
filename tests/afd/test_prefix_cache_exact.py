"""Prefix caching changes no output: with it on, every engine gives the tokens (greedy) and, in
the exact mode (`batch_invariant=True`), the log-probabilities it gives with it off, in
aggregated mode, AFD in one process and AFD over worker processes (shm), under a KV budget
small enough to preempt and evict; and the hits are real (counted, and fewer tokens fed).

Requests share a system prompt. They run in waves on one engine: a wave's blocks enter the cache
once its prefill is done, so the next wave hits them.
"""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
EXACT = dict(batch_invariant=True, block_size=4)


def _waves(seed: int = 0, vocab: int = 250) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, vocab, (22,), generator=g).tolist()  # 5 full blocks and 2

    def tail(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    # the third: system's blocks 1 and 2 after another block 0 (keys must chain the prefix)
    first = [system + tail(3), tail(9), tail(4) + system[4:12] + tail(2)]
    second = [system + tail(5), system[:8] + tail(1), system[:13], tail(2) + system]
    third = [first[0], second[2] + tail(4), system]  # a repeat; an extension; the bare prefix
    return [first, second, third]


def _run(model_dir, caching: bool, params=GREEDY, **engine):
    """Outputs per wave (token ids and logprobs) and the engine's counters at the end."""
    outs = []
    with LLM(str(model_dir), enable_prefix_caching=caching, **{**EXACT, **engine}) as llm:
        for wave in _waves():
            res = llm.generate(wave, params)
            outs.append([(o.token_ids, o.logprobs, _plps(o.prompt_logprobs)) for o in res])
        st = llm.engine.state(afd=False)
        counters = {
            k: st.counter(k)
            for k in ("prefix_cache_hits", "prefix_cache_queries", "prompt_tokens", "preemptions")
        }
        counters["fed"] = st.counter("recomputed_tokens")
        return outs, counters, dict(st.routing)


def _plps(prompt_logprobs):
    if prompt_logprobs is None:
        return None
    return [None if d is None else {k: v.logprob for k, v in d.items()} for d in prompt_logprobs]


ENGINES = {
    "aggregated": dict(mode="aggregated", attention_workers=1, microbatches=1),
    "afd": dict(mode="afd", attention_workers=2, microbatches=2),
}


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_caching_on_equals_off(tiny_model_dirs, name):
    on, hits, _ = _run(tiny_model_dirs["qwen3-moe"], True, **ENGINES[name])
    off, none, _ = _run(tiny_model_dirs["qwen3-moe"], False, **ENGINES[name])
    assert on == off
    assert none["prefix_cache_hits"] == 0 and hits["prefix_cache_hits"] >= 40
    assert hits["prompt_tokens"] == none["prompt_tokens"]


def test_caching_on_equals_off_under_preemption_and_eviction(tiny_model_dirs):
    """24 blocks of 4 tokens for 2 workers' worth of sequences, a 16-token step: preemptions,
    chunked prefills and evictions of cached blocks all happen."""
    tight = dict(
        mode="afd", attention_workers=2, microbatches=2, num_kv_blocks=14, max_num_batched_tokens=16
    )
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=0)
    on, c_on, _ = _run(tiny_model_dirs["llama"], True, params, **tight)
    off, c_off, _ = _run(tiny_model_dirs["llama"], False, params, **tight)
    assert on == off
    assert c_on["preemptions"] > 0 and c_off["preemptions"] > 0
    assert c_on["prefix_cache_hits"] > 0


def test_prompt_logprobs_are_the_same_with_the_cache(tiny_model_dirs):
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=1)
    on, _, _ = _run(tiny_model_dirs["qwen3"], True, params, **ENGINES["aggregated"])
    off, _, _ = _run(tiny_model_dirs["qwen3"], False, params, **ENGINES["aggregated"])
    assert on == off


def test_router_sends_a_shared_prefix_to_the_worker_that_caches_it(tiny_model_dirs):
    _, counters, routing = _run(tiny_model_dirs["llama"], True, **ENGINES["afd"])
    assert routing["prefix"] > 0 and sum(routing.values()) == 10
    _, _, off = _run(tiny_model_dirs["llama"], False, **ENGINES["afd"])
    assert off == {"load": 10, "prefix": 0, "balance": 0}


def test_worker_processes_over_shm(tiny_model_dirs):
    mp = dict(mode="afd", attention_workers=2, microbatches=1, transport="shm", num_kv_blocks=20)
    on, c_on, routing = _run(tiny_model_dirs["qwen3-moe"], True, **mp)
    off, _, _ = _run(tiny_model_dirs["qwen3-moe"], False, **mp)
    assert on == off
    assert c_on["prefix_cache_hits"] > 0  # the counters crossed from the worker processes
    assert routing["prefix"] > 0  # the front mirrored the workers' caches from their events
