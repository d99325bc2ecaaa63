"""AFD (r attention workers, one FFN worker, M microbatches) gives exactly the aggregated tokens."""

from __future__ import annotations

import itertools

import pytest
import torch

from afdserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def _prompts(n: int = 7, seed: int = 0, vocab: int = 250) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 5, 13, 31, 64, 3][:n]
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def _run(model_dir, prompts, params=GREEDY, **engine) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(model_dir), **engine)
    try:
        outs = llm.generate(prompts, params)
    finally:
        llm.close()
    return [o.token_ids for o in outs], llm


@pytest.fixture(scope="module")
def aggregated_reference(tiny_model_dirs):
    cache = {}

    def get(arch: str, dtype: str = "float32") -> list[list[int]]:
        if (arch, dtype) not in cache:
            cache[arch, dtype], _ = _run(
                tiny_model_dirs[arch],
                _prompts(),
                mode="aggregated",
                attention_workers=1,
                microbatches=1,
                dtype=dtype,
            )
        return cache[arch, dtype]

    return get


# the full r x M grid on one dense and one MoE architecture, the diagonal on the others
CASES = [
    (a, r, m) for a in ("llama", "qwen3-moe") for r, m in itertools.product([1, 2, 3], [1, 2, 3])
] + [(a, k, k) for a in ("qwen2", "qwen3", "mixtral") for k in (1, 2, 3)]


@pytest.mark.parametrize("arch,r,m", CASES)
def test_afd_equals_aggregated(tiny_model_dirs, aggregated_reference, arch, r, m):
    tokens, llm = _run(
        tiny_model_dirs[arch], _prompts(), mode="afd", attention_workers=r, microbatches=m
    )
    assert tokens == aggregated_reference(arch)
    routed = llm.engine.router.routed
    assert sum(routed) == len(_prompts()) and max(routed) - min(routed) <= 2, routed


@pytest.mark.parametrize("arch", ["qwen3-moe", "llama"])
def test_afd_equals_aggregated_under_preemption_and_chunking(
    tiny_model_dirs, aggregated_reference, arch
):
    # 24 blocks of 4 tokens cannot hold every sequence at once: the scheduler must preempt
    # and recompute; a 16-token step budget chunks the long prompts across steps.
    tokens, llm = _run(
        tiny_model_dirs[arch],
        _prompts(),
        mode="afd",
        attention_workers=2,
        microbatches=2,
        block_size=4,
        num_kv_blocks=24,
        max_num_batched_tokens=16,
    )
    assert sum(w.scheduler.counters.preemptions for w in llm.engine.workers) > 0
    assert tokens == aggregated_reference(arch)


def test_afd_equals_aggregated_in_bfloat16(tiny_model_dirs, aggregated_reference):
    tokens, _ = _run(
        tiny_model_dirs["qwen3-moe"],
        _prompts(),
        mode="afd",
        attention_workers=2,
        microbatches=2,
        dtype="bfloat16",
    )
    assert tokens == aggregated_reference("qwen3-moe", "bfloat16")


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model_dirs):
    d = tiny_model_dirs["qwen3-moe"]
    target = [5, 17, 99, 42]
    params = SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True
    )
    alone, _ = _run(d, [target], params, mode="aggregated", attention_workers=1, microbatches=1)
    others = _prompts(5, seed=7)
    mixed_params = [SamplingParams(temperature=1.0, max_tokens=10, seed=i) for i in range(5)]
    batched, _ = _run(
        d,
        [*others[:2], target, *others[2:]],
        [*mixed_params[:2], params, *mixed_params[2:]],
        mode="afd",
        attention_workers=3,
        microbatches=2,
    )
    again, _ = _run(
        d,
        [target],
        params,
        mode="afd",
        attention_workers=1,
        microbatches=1,
        block_size=4,
        num_kv_blocks=8,
    )
    assert batched[2] == alone[0] == again[0]
    other_seed, _ = _run(
        d,
        [target],
        SamplingParams(
            temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=24, ignore_eos=True
        ),
        mode="aggregated",
        attention_workers=1,
    )
    assert other_seed[0] != alone[0]
