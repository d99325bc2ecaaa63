"""min_tokens, logit_bias, the penalties and min_p against hand-computed logits; their order;
the token history (chunked prompts, preemption, retain); HF's repetition penalty; validation."""

from __future__ import annotations

import math

import pytest
import torch

from afdserve.engine.penalties import TokenHistory, apply_min_p, process_logits
from afdserve.engine.sampler import sample
from afdserve.errors import UserInputError
from afdserve.types import SamplingParams, ScheduledChunk

NEG_INF = float("-inf")
LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]
PROMPT = (0, 1)
OUTPUTS = (2, 2, 3)


def chunk(
    seq_id: int = 0,
    tokens: tuple[int, ...] = (1,),
    *,
    start: int = 0,
    index: int = 0,
    seed: int = 0,
    sample: bool = True,
    **params: object,
) -> ScheduledChunk:
    return ScheduledChunk(
        seq_id=seq_id,
        token_ids=tokens,
        start_pos=start,
        block_table=(1,),
        sample=sample,
        params=SamplingParams(**params),
        sampling_seed=seed,
        output_index=index,
    )


def history_of(
    params: dict, prompt=PROMPT, outputs=OUTPUTS, vocab: int = len(LOGITS), seq_id: int = 0
) -> tuple[TokenHistory, ScheduledChunk]:
    """A history as a runner builds it: the prompt fed, then each output sampled and fed back.
    Returns it with the chunk that samples the next token."""
    h = TokenHistory()
    c = chunk(seq_id, tuple(prompt), **params)
    h.observe([c])
    for i, tok in enumerate(outputs):
        if c.params.uses_penalties:
            h.tensors([c], vocab, torch.device("cpu"))
        h.record([c], [tok])
        c = chunk(seq_id, (tok,), start=len(prompt) + i, index=i + 1, **params)
        h.observe([c])
    return h, c


def processed(params: dict, logits=LOGITS, eos=(), **kw) -> list[float]:
    h, c = history_of(params, vocab=len(logits), **kw)
    return process_logits(torch.tensor([logits]), [c], h, eos)[0].tolist()


def test_presence_and_frequency_penalties_count_the_generated_tokens_only():
    # outputs 2, 2, 3: token 2 counts 2, token 3 counts 1; prompt tokens 0, 1 are not penalised
    assert processed({"presence_penalty": 0.5, "frequency_penalty": 0.25}) == [
        2.0, -1.0, 0.5 - 0.5 - 0.5, 3.0 - 0.25 - 0.5, -2.0, 0.0,
    ]  # fmt: skip
    assert processed({"presence_penalty": -1.0}) == [2.0, -1.0, 1.5, 4.0, -2.0, 0.0]
    assert processed({"frequency_penalty": 2.0}) == [2.0, -1.0, -3.5, 1.0, -2.0, 0.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    # seen: prompt {0, 1} and outputs {2, 3}; 4 and 5 were never seen
    assert processed({"repetition_penalty": 2.0}) == [1.0, -2.0, 0.25, 1.5, -2.0, 0.0]
    assert processed({"repetition_penalty": 0.5}) == [4.0, -0.5, 1.0, 6.0, -2.0, 0.0]
    # all three: repetition first, then frequency and presence
    got = processed({"repetition_penalty": 2.0, "frequency_penalty": 0.25, "presence_penalty": 0.5})
    assert got == [1.0, -2.0, 0.25 - 0.5 - 0.5, 1.5 - 0.25 - 0.5, -2.0, 0.0]


def test_logit_bias_adds_to_the_listed_tokens():
    assert processed({"logit_bias": {1: 5.0, 4: -100}}) == [2.0, 4.0, 0.5, 3.0, -102.0, 0.0]
    assert processed({"logit_bias": {99: 5.0}}) == LOGITS  # beyond the logits: nothing to bias


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    params = {"min_tokens": 4, "stop_token_ids": (0, 99), "max_tokens": 9}
    # three tokens generated, four wanted: EOS (5) and the stop id 0 are masked (99 is beyond V)
    assert processed(params, eos=(5,)) == [NEG_INF, -1.0, 0.5, 3.0, -2.0, NEG_INF]
    # even with ignore_eos, as vLLM (its min-tokens stop set always holds the EOS id)
    assert processed({**params, "ignore_eos": True}, eos=(5,))[5] == NEG_INF
    assert processed({**params, "min_tokens": 3}, eos=(5,)) == LOGITS  # reached


def test_bias_comes_before_the_penalties_and_the_mask_wins():
    # vLLM's order: min_tokens, logit_bias, then penalties on the biased logit:
    # token 1 (seen): -1 + 2 = 1 > 0, then / 4 = 0.25 (penalty first would give -4 + 2 = -2)
    got = processed(
        {"logit_bias": {1: 2.0, 5: 100.0}, "repetition_penalty": 4.0, "min_tokens": 5}, eos=(5,)
    )
    assert got[1] == 0.25 and got[5] == NEG_INF


def test_rows_without_processing_are_returned_as_they_are():
    logits = torch.tensor([LOGITS, LOGITS])
    assert process_logits(logits, [chunk(0), chunk(1)], None) is logits
    h, c = history_of({"repetition_penalty": 2.0}, seq_id=1)
    out = process_logits(logits, [chunk(0), c], h)
    assert out[0].tolist() == LOGITS and out[1].tolist() != LOGITS
    assert logits[1].tolist() == LOGITS  # the raw logits are not modified


def test_greedy_uses_the_processed_logits_and_logprobs_the_raw_ones():
    logits = torch.tensor([LOGITS])
    out = sample(logits, [chunk(temperature=0, logit_bias={4: 100.0}, logprobs=1)])[0]
    assert out.token_id == 4
    raw = logits.log_softmax(-1)[0]
    assert out.logprob == pytest.approx(raw[4].item())  # vLLM's default: raw logprobs
    assert out.top_logprobs[0][0] == 3
    # the seeded random path too
    out = sample(logits, [chunk(temperature=1.0, seed=5, logit_bias={4: 100.0})])[0]
    assert out.token_id == 4


def test_hf_repetition_penalty_processor_gives_the_same_logits():
    transformers = pytest.importorskip("transformers")
    vocab = 50
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, vocab, (12,), generator=g).tolist()
    outputs = torch.randint(0, vocab, (9,), generator=g).tolist()
    logits = (torch.randn(1, vocab, generator=g) * 3).tolist()[0]
    for penalty in (1.3, 0.7, 2.0):
        hf = transformers.RepetitionPenaltyLogitsProcessor(penalty)
        want = hf(torch.tensor([prompt + outputs]), torch.tensor([logits]))[0]
        got = processed({"repetition_penalty": penalty}, logits, prompt=prompt, outputs=outputs)
        assert got == want.tolist()  # bit for bit: both divide positive, multiply negative


def test_min_p_keeps_tokens_at_least_min_p_times_the_most_likely():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])  # relative to the top: 1, .5, .3, .2
    scaled = probs.log().unsqueeze(0).repeat(3, 1)
    out = apply_min_p(scaled.clone(), [0.28, 0.0, 0.6])
    assert torch.isinf(out).tolist() == [
        [False, False, False, True],
        [False, False, False, False],
        [False, True, True, True],
    ]
    assert out[0, :3].tolist() == scaled[0, :3].tolist()


def test_min_p_applies_after_temperature():
    logits = torch.tensor([0.5, 0.25, 0.15, 0.1]).log().unsqueeze(0)
    n = 300
    hot = [sample(logits, [chunk(i, seed=i, min_p=0.28)])[0].token_id for i in range(n)]
    # at temperature 1 the relative probabilities are 1, .5, .3, .2: three tokens remain
    assert set(hot) == {0, 1, 2}
    # at 0.5 they are squared (1, .25, .09, .04): only the top one remains
    cold = [
        sample(logits, [chunk(i, seed=i, min_p=0.28, temperature=0.5)])[0].token_id
        for i in range(n)
    ]
    assert set(cold) == {0}


def test_a_row_with_penalties_gets_the_same_token_in_any_batch():
    vocab = 40
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(5, vocab, generator=g) * 2
    top = logits.argmax(-1).tolist()
    kinds = [
        {"temperature": 0.8, "presence_penalty": 2.0, "frequency_penalty": 2.0, "seed": 1},
        {"temperature": 0.0, "repetition_penalty": 3.0},
        {"temperature": 1.1, "min_p": 0.1, "logit_bias": {3: 6.0}, "top_k": 9},
        {"temperature": 0.9},
        {"temperature": 0.0, "min_tokens": 5, "stop_token_ids": (7,)},
    ]
    prompts = [torch.randint(0, vocab, (6,), generator=g).tolist() for _ in kinds]
    outs = [torch.randint(0, vocab, (4,), generator=g).tolist() for _ in kinds]
    outs[0] = [2] * 4  # what row 0 samples without penalties
    prompts[1][0] = top[1]  # row 1's greedy token was seen
    eos = (top[4],)  # row 4's greedy token is EOS, masked by min_tokens

    def run(order: list[int]) -> dict[int, int]:
        chunks, hist = [], TokenHistory()
        for i in order:
            h, c = history_of(kinds[i], prompt=prompts[i], outputs=outs[i], vocab=vocab, seq_id=i)
            hist._seqs.update(h._seqs)  # one worker's history holds them all
            chunks.append(c)
        got = sample(logits[order], chunks, hist, eos_token_ids=eos)
        return {i: s.token_id for i, s in zip(order, got, strict=True)}

    together = run([0, 1, 2, 3, 4])
    plain = [
        chunk(
            i, index=4, temperature=k["temperature"], top_k=k.get("top_k", 0), seed=k.get("seed", 0)
        )
        for i, k in enumerate(kinds)
    ]
    unprocessed = [s.token_id for s in sample(logits, plain)]
    assert unprocessed[0] == 2 and unprocessed[1] == top[1] and unprocessed[4] == top[4]
    assert [together[i] != unprocessed[i] for i in range(5)] == [True, True, True, False, True]
    assert together == run([4, 2, 0, 3, 1])
    assert together == {k: v for i in range(5) for k, v in run([i]).items()}


def test_history_counts_sampled_tokens_and_reads_chunked_prompts():
    h = TokenHistory()
    p = {"presence_penalty": 1.0}
    cpu = torch.device("cpu")
    h.observe([chunk(0, (1, 2), sample=False, **p)])  # a prompt in two chunks
    first = chunk(0, (3, 3), start=2, **p)
    h.observe([first])
    logits = torch.zeros(1, 8)
    logits[0, 6] = 5.0
    assert sample(logits, [first], h)[0].token_id == 6
    prompt, counts = h.tensors([first], 8, cpu)
    assert prompt[0].tolist() == [False, True, True, True, False, False, False, False]
    assert counts[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]
    # a recompute after a preemption re-feeds prompt and output: nothing changes
    h.observe([chunk(0, (1, 2, 3, 3, 6), index=1, **p)])
    again = h.tensors([first], 8, cpu)
    assert torch.equal(again[0], prompt) and torch.equal(again[1], counts)
    h.retain({0})
    assert len(h) == 1
    h.retain(set())
    assert len(h) == 0


def test_preemption_before_the_first_token_rebuilds_the_same_prompt_mask():
    p = {"repetition_penalty": 1.5}
    cpu = torch.device("cpu")
    once = TokenHistory()
    once.observe([chunk(0, (4, 5, 6), **p)])
    twice = TokenHistory()
    twice.observe([chunk(0, (4, 5), sample=False, **p)])  # preempted after this chunk
    twice.observe([chunk(0, (4, 5, 6), **p)])  # recomputed from the start
    a, b = once.tensors([chunk(**p)], 9, cpu), twice.tensors([chunk(**p)], 9, cpu)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_penalties_need_a_history():
    with pytest.raises(ValueError, match="token history"):
        sample(torch.zeros(1, 4), [chunk(presence_penalty=1.0)])
    with pytest.raises(RuntimeError, match="no token history"):
        TokenHistory().observe([chunk(presence_penalty=1.0, index=3)])


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -2.01}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": "1"}, "frequency_penalty must be a number"),
        ({"presence_penalty": float("nan")}, "presence_penalty must be a number"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
        ({"repetition_penalty": math.inf}, "repetition_penalty must be a finite number > 0"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"min_p": True}, "min_p must be a number"),
        ({"min_tokens": -1}, r"min_tokens must be in \[0, max_tokens=16\]"),
        ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens must be in \[0, max_tokens=4\]"),
        ({"min_tokens": 1.0}, "min_tokens must be an integer"),
        ({"logit_bias": {1: 100.5}}, r"logit_bias\[1\] must be in \[-100, 100\]"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be non-negative token ids"),
        ({"logit_bias": {"1": 1.0}}, "logit_bias keys must be non-negative token ids"),
        ({"logit_bias": {1: None}}, r"logit_bias\[1\] must be a number"),
        ({"logit_bias": [(1, 2.0), (1, 3.0)]}, "gives token id 1 twice"),
        ({"logit_bias": "1:2"}, "logit_bias must map token ids to biases"),
        ({"logit_bias": 5}, "logit_bias must map token ids to biases"),
    ],
)
def test_bad_values_are_rejected(kwargs, msg):
    with pytest.raises(UserInputError, match=msg):
        SamplingParams(**kwargs)


def test_values_are_normalised():
    p = SamplingParams(presence_penalty=1, repetition_penalty=2, logit_bias={9: 1, 3: -2.5})
    assert p.presence_penalty == 1.0 and isinstance(p.presence_penalty, float)
    assert p.logit_bias == ((3, -2.5), (9, 1.0)) and isinstance(p.logit_bias[1][1], float)
    assert SamplingParams(logit_bias=[(9, 1), (3, -2.5)]).logit_bias == p.logit_bias
    assert hash(p) == hash(
        SamplingParams(presence_penalty=1.0, repetition_penalty=2.0, logit_bias=p.logit_bias)
    )
    assert not SamplingParams().uses_penalties
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert not SamplingParams(logit_bias={1: 2.0}, min_tokens=3, min_p=0.5).uses_penalties
