"""AFD (r attention workers, one FFN worker, M microbatches) gives exactly the aggregated tokens
and log-probabilities in the exact mode (`batch_invariant=True`), and agrees within a stated
tolerance in the default (fast) mode."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.model.make_model import make_model

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0)
EXACT = dict(batch_invariant=True)
FAST_LOGPROB_TOL = 1e-3
"""Fast mode: AFD's log-probability of each token is within this of aggregated's (float32)."""


def _prompts(n: int = 7, seed: int = 0, vocab: int = 250) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 5, 13, 31, 64, 3][:n]
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def _run(model_dir, prompts, params=GREEDY, **engine) -> tuple[list[list[int]], LLM]:
    """Token ids and log-probabilities of each prompt (exact mode unless `engine` says)."""
    outs, llm = _generate(model_dir, prompts, params, **{**EXACT, **engine})
    return [(o.token_ids, o.logprobs) for o in outs], llm


def _generate(model_dir, prompts, params, **engine):
    llm = LLM(str(model_dir), **engine)
    try:
        return llm.generate(prompts, params), llm
    finally:
        llm.close()


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
    # and the reference itself chunked differently (one worker, no chunk budget): the same bits
    other, _ = _run(
        tiny_model_dirs[arch],
        _prompts(),
        mode="aggregated",
        attention_workers=1,
        microbatches=1,
        max_num_batched_tokens=7,
    )
    assert other == aggregated_reference(arch)


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


def test_fast_mode_afd_agrees_with_aggregated_within_tolerance(tiny_model_dirs):
    """The default kernels do not promise bits: where both pick the same token, its
    log-probability agrees within FAST_LOGPROB_TOL (and the first tokens of every prompt
    agree, before any near-tie can send the two down different paths)."""
    d = tiny_model_dirs["llama"]
    agg, _ = _generate(d, _prompts(), GREEDY, mode="aggregated", attention_workers=1)
    afd, _ = _generate(d, _prompts(), GREEDY, mode="afd", attention_workers=2, microbatches=2)
    for a, b in zip(agg, afd, strict=True):
        assert a.token_ids[:4] == b.token_ids[:4]
        for ta, tb, la, lb in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs, strict=True):
            if ta != tb:
                break
            assert math.isclose(la, lb, abs_tol=FAST_LOGPROB_TOL), (la, lb)


@pytest.fixture(scope="module")
def smollm_shaped_dir(tmp_path_factory):
    """A random model of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads of
    64, MLP 1536), with a smaller vocabulary: what the exactness aim is stated on."""
    return make_model(
        "llama",
        "small",
        0,
        tmp_path_factory.mktemp("smollm-shaped") / "m",
        config_overrides=dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=4096,
            tie_word_embeddings=True,
        ),
    )


def test_afd_equals_aggregated_on_a_30_layer_model(smollm_shaped_dir):
    """The acceptance case: 2A1F, M=2, 8 prompts of different lengths, 48 tokens each, tokens
    and log-probabilities bit for bit."""
    g = torch.Generator().manual_seed(5)
    prompts = [
        torch.randint(3, 4096, (n,), generator=g).tolist() for n in (3, 17, 40, 77, 128, 9, 256, 60)
    ]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=0)
    agg, _ = _run(
        smollm_shaped_dir, prompts, params, mode="aggregated", attention_workers=1, microbatches=1
    )
    afd, _ = _run(
        smollm_shaped_dir, prompts, params, mode="afd", attention_workers=2, microbatches=2
    )
    assert afd == agg
    assert all(len(t) == 48 and len(lp) == 48 for t, lp in agg)


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
