"""The KV host tier: a workload that preempted by recompute now resumes from the tier, with the
same tokens and (exact mode) log-probabilities, in aggregated mode and in AFD, in one process
and over worker processes."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.errors import UserInputError

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in (30, 9, 21, 14, 26, 5)]


def _run(model_dir, **engine):
    # 16 blocks of 4 tokens per worker cannot hold these sequences at once: preemption
    opts = dict(batch_invariant=True, block_size=4, num_kv_blocks=16, max_num_batched_tokens=32)
    with LLM(str(model_dir), **{**opts, **engine}) as llm:
        outs = [(o.token_ids, o.logprobs) for o in llm.generate(_prompts(), PARAMS)]
        st = llm.engine.state(afd=False)
        names = ("preemptions", "recomputed_tokens", "kv_host_blocks_in", "kv_host_blocks_out")
        return outs, {k: st.counter(k) for k in names}


@pytest.mark.parametrize(
    "engine",
    [
        dict(mode="aggregated", attention_workers=1, microbatches=1),
        dict(mode="afd", attention_workers=2, microbatches=2),
        dict(mode="afd", attention_workers=2, microbatches=1, transport="shm"),
    ],
    ids=["aggregated", "afd", "afd-shm"],
)
def test_preempted_requests_resume_from_the_host_tier(tiny_model_dirs, engine):
    model = tiny_model_dirs["qwen3-moe"]
    ref, plain = _run(model, enable_prefix_caching=False, **engine)
    tier, c = _run(model, num_host_kv_blocks=64, **engine)
    assert tier == ref
    assert plain["preemptions"] > 0 and c["preemptions"] > 0
    assert c["kv_host_blocks_out"] > 0 and c["kv_host_blocks_in"] > 0
    # only the unfilled last block of a preempted sequence is fed again
    assert c["recomputed_tokens"] < plain["recomputed_tokens"] / 2


def test_a_host_tier_needs_prefix_caching():
    with pytest.raises(UserInputError, match="needs enable_prefix_caching"):
        LLM("builtin:tiny-llama", enable_prefix_caching=False, kv_host_tier_gib=1.0)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
@pytest.mark.parametrize(
    "engine",
    [
        dict(mode="aggregated", attention_workers=1, microbatches=1),
        dict(mode="afd", attention_workers=2, microbatches=2),
    ],
    ids=["aggregated", "afd"],
)
def test_quantised_kv_resumes_from_the_host_tier_with_its_scales(
    tiny_model_dirs, engine, kv_cache_dtype
):
    """The tier copies a quantised block's codes and scales: a resumed request reads the KV it
    left with, so its tokens are those of recomputing it (the same rows quantise the same)."""
    model = tiny_model_dirs["qwen3-moe"]
    q = dict(kv_cache_dtype=kv_cache_dtype, **engine)
    ref, plain = _run(model, enable_prefix_caching=False, **q)
    tier, c = _run(model, num_host_kv_blocks=64, **q)
    assert tier == ref
    assert c["kv_host_blocks_out"] > 0 and c["kv_host_blocks_in"] > 0
    assert c["recomputed_tokens"] < plain["recomputed_tokens"] / 2
