"""Penalties, logit_bias, min_tokens and min_p through the whole engine: against HF generate
(its RepetitionPenaltyLogitsProcessor, and OpenAI's presence/frequency penalties as a
processor), a bias that forces a token, min_tokens against a likely EOS, and AFD == aggregated
bit for bit (exact mode) under preemption and chunked prefill."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

ARCH = "qwen3-moe"
PROMPTS = [[5, 9, 200, 17], [100, 101, 102], [42] * 5, list(range(30, 60))]
AGGREGATED = dict(mode="aggregated", attention_workers=1, microbatches=1)


def _generate(model_dir, prompts, params, **engine):
    with LLM(str(model_dir), dtype="float32", **engine) as llm:
        outs = llm.generate(prompts, params)
        preemptions = sum(w.scheduler.counters.preemptions for w in llm.engine.workers)
        assert all(len(w.runner.history) == 0 for w in llm.engine.workers)  # all forgotten
    return outs, preemptions


class _OpenAIPenalties(transformers.LogitsProcessor):
    """The reference: logit -= frequency * count + presence * [count > 0], over the tokens
    generated after the prompt (one unpadded prompt per batch)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0)


def _hf_greedy(model_dir, prompts, new_tokens, repetition=1.0, presence=0.0, frequency=0.0):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # like ignore_eos
    out = []
    with torch.no_grad():
        for p in prompts:
            procs = transformers.LogitsProcessorList()
            if presence or frequency:
                procs.append(_OpenAIPenalties(len(p), presence, frequency))
            seq = model.generate(
                input_ids=torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                repetition_penalty=repetition,
                logits_processor=procs,
                pad_token_id=0,
            )
            out.append(seq[0, len(p) :].tolist())
    return out


@pytest.mark.parametrize(
    "penalties",
    [
        {"repetition_penalty": 1.5},
        {"repetition_penalty": 0.8},
        {"presence_penalty": 1.2, "frequency_penalty": 0.7},
        {"repetition_penalty": 1.3, "presence_penalty": -0.5, "frequency_penalty": 1.0},
    ],
    ids=["rep1.5", "rep0.8", "presence+frequency", "all"],
)
def test_greedy_penalties_match_hf_generate(tiny_model_dirs, penalties):
    d = tiny_model_dirs[ARCH]
    want = _hf_greedy(
        d,
        PROMPTS,
        16,
        penalties.get("repetition_penalty", 1.0),
        penalties.get("presence_penalty", 0.0),
        penalties.get("frequency_penalty", 0.0),
    )
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **penalties)
    outs, _ = _generate(d, PROMPTS, params, **AGGREGATED)
    assert [o.token_ids for o in outs] == want


def test_repetition_penalty_breaks_a_repeating_greedy_output(tiny_model_dirs):
    d = tiny_model_dirs[ARCH]
    prompt = [100, 101, 102]  # greedy repeats 348, 317, ... on this tiny model
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    (base,), _ = _generate(d, [prompt], plain, **AGGREGATED)
    assert len(set(base.token_ids)) <= 10, base.token_ids  # it does repeat
    penalised = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=2)
    (out,), _ = _generate(d, [prompt], penalised, **AGGREGATED)
    assert len(set(out.token_ids)) > len(set(base.token_ids))
    favoured = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=0.5)
    (rep,), _ = _generate(d, [prompt], favoured, **AGGREGATED)
    assert len(set(rep.token_ids)) < len(set(base.token_ids))


def test_a_huge_logit_bias_forces_its_token(tiny_model_dirs):
    d = tiny_model_dirs[ARCH]
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={77: 100.0}),
        SamplingParams(
            temperature=1.0, seed=3, max_tokens=6, ignore_eos=True, logit_bias={77: 100}
        ),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={77: -100.0}),
    ]
    outs, _ = _generate(d, [[5, 9, 200]] * 3, params, **AGGREGATED)
    assert outs[0].token_ids == outs[1].token_ids == [77] * 6
    assert 77 not in outs[2].token_ids


def test_min_tokens_delays_a_likely_eos(tiny_model_dirs):
    d = tiny_model_dirs[ARCH]
    with LLM(str(d), dtype="float32", **AGGREGATED) as llm:
        eos = sorted(llm.engine.workers[0].scheduler.eos_token_ids)
        likely = {eos[0]: 100.0}  # EOS is now (nearly) certain at every step
        early, delayed, sampled = llm.generate(
            [[5, 9, 200]] * 3,
            [
                SamplingParams(temperature=0, max_tokens=10, logit_bias=likely),
                SamplingParams(temperature=0, max_tokens=10, logit_bias=likely, min_tokens=4),
                SamplingParams(
                    temperature=0.9, seed=1, max_tokens=10, logit_bias=likely, min_tokens=6
                ),
            ],
        )
    assert (early.token_ids, early.finish_reason) == ([eos[0]], "stop")
    assert len(delayed.token_ids) == 5 and delayed.token_ids[-1] == eos[0]
    assert not set(delayed.token_ids[:4]) & set(eos)  # every EOS id was masked, not just one
    assert delayed.finish_reason == "stop"
    assert len(sampled.token_ids) == 7 and sampled.token_ids[-1] == eos[0]


MIXED = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.4,
                   logprobs=2),
    SamplingParams(temperature=0.9, seed=7, max_tokens=12, ignore_eos=True, presence_penalty=1.0,
                   frequency_penalty=0.5, min_p=0.05, logprobs=0),
    SamplingParams(temperature=0.8, seed=2, max_tokens=12, logit_bias={3: 5.0, 40: -50.0},
                   min_tokens=5, top_k=30),
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=1.1, seed=9, max_tokens=12, ignore_eos=True, min_p=0.2, top_p=0.9,
                   repetition_penalty=0.9, frequency_penalty=-0.5),
]  # fmt: skip


def test_afd_equals_aggregated_with_penalties_under_preemption(tiny_model_dirs):
    d = tiny_model_dirs[ARCH]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(MIXED))]
    ref, _ = _generate(d, prompts, MIXED, batch_invariant=True, **AGGREGATED)
    afd, preemptions = _generate(
        d,
        prompts,
        MIXED,
        batch_invariant=True,
        mode="afd",
        attention_workers=2,
        microbatches=2,
        block_size=4,
        num_kv_blocks=12,
        max_num_batched_tokens=8,
    )
    assert preemptions > 0  # the recomputed sequences kept their history
    assert [(o.token_ids, o.logprobs) for o in afd] == [(o.token_ids, o.logprobs) for o in ref]
    alone = [
        _generate(d, [p], params, batch_invariant=True, **AGGREGATED)[0][0]
        for p, params in zip(prompts, MIXED, strict=True)
    ]
    assert [o.token_ids for o in alone] == [o.token_ids for o in ref]
