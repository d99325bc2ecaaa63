"""The scheduler's share of prompt logprobs, without a model: which prompt tokens each chunk asks
the runner to score, and that a request's prompt logprobs go out once, on its first event, all
of them in order, however its prompt is chunked and however often it is preempted (before,
during or after its prefill)."""

from __future__ import annotations

import pytest

from afdserve.types import (
    ChunkPromptLogprobs,
    PromptLogprob,
    SampledToken,
    StepPlan,
    StepResult,
)
from tests.engine._helpers import check_invariants, check_plan, make_request, make_scheduler

PROMPT_LENS = (1, 2, 13, 29, 40)


def _answer(plan: StepPlan, scored: dict[tuple[int, int], int]) -> StepResult:
    """Sample token 100 for every sampling chunk; score each asked-for prompt token with its
    position encoded in the logprob (-position) and its rank (position), counting every score."""
    prompt = []
    for c in plan.chunks:
        if not c.prompt_logprob_targets:
            continue
        entries = []
        for i, t in enumerate(c.prompt_logprob_targets):
            pos = c.start_pos + c.prompt_logprob_start + i + 1
            scored[c.seq_id, pos] = scored.get((c.seq_id, pos), 0) + 1
            entries.append(PromptLogprob(t, -float(pos), pos, ((7, -0.5),)))
        prompt.append(ChunkPromptLogprobs(c.seq_id, tuple(entries)))
    sampled = tuple(SampledToken(c.seq_id, 100) for c in plan.chunks if c.sample)
    return StepResult(plan.step_id, sampled, tuple(prompt))


def _run(num_blocks: int, budget: int, asks=lambda i: 0):
    s = make_scheduler(num_blocks=num_blocks, block_size=4, budget=budget, max_model_len=64)
    prompts = {}
    for i, n in enumerate(PROMPT_LENS):
        req = make_request(f"r{i}", n, max_tokens=12, ignore_eos=True, prompt_logprobs=asks(i))
        prompts[req.request_id] = req.prompt_token_ids
        s.add_request(req)
    scored: dict[tuple[int, int], int] = {}
    carried: dict[str, list] = {rid: [] for rid in prompts}
    mid_prefill_preemptions = 0
    while s.has_unfinished():
        plan = s.schedule()
        check_plan(s, plan)
        for sid in plan.preempted:
            seq = s.sequence_by_seq_id(sid)
            if seq.output_index == 0 and seq.prompt_logprobs:
                mid_prefill_preemptions += 1  # preempted with some of its prompt scored
        events = s.update(plan, _answer(plan, scored))
        check_invariants(s)
        for ev in events:
            carried[ev.request_id].append(ev.prompt_logprobs)
    return s, prompts, scored, carried, mid_prefill_preemptions


@pytest.mark.parametrize("num_blocks,budget", [(200, 64), (200, 5), (14, 7), (12, 64)], ids=str)
def test_prompt_logprobs_are_sent_once_in_order_and_scored_once(num_blocks, budget):
    s, prompts, scored, carried, _ = _run(num_blocks, budget)
    for sid, (rid, prompt) in enumerate(prompts.items()):
        first, *rest = carried[rid]
        assert [e.token_id for e in first] == list(prompt[1:])
        assert [e.logprob for e in first] == [-float(p) for p in range(1, len(prompt))]
        assert all(e.top_logprobs == ((7, -0.5),) for e in first)
        assert all(p is None for p in rest)  # never again, preempted after or not
        # every prompt position after the first scored exactly once, recomputes included
        assert {p: scored[sid, p] for p in range(1, len(prompt))} == dict.fromkeys(
            range(1, len(prompt)), 1
        )
    assert {sid for sid, _ in scored} <= set(range(len(prompts)))
    assert sum(scored.values()) == sum(n - 1 for n in PROMPT_LENS)


def test_preemption_mid_prefill_keeps_what_was_scored():
    """13 usable blocks of 4 and a 7-token budget: prompts are chunked and preempted part-way
    through their prefill; their recomputes score only the positions still missing."""
    s, prompts, scored, carried, mid = _run(14, 7)
    assert s.counters.preemptions > 0 and mid > 0
    assert s.counters.recomputed_tokens > 0
    assert all(v == 1 for v in scored.values())


def test_only_requests_that_ask_are_scored():
    _, prompts, scored, carried, _ = _run(200, 9, asks=lambda i: None if i % 2 else 3)
    for i, rid in enumerate(prompts):
        first = carried[rid][0]
        assert (first is None) == (i % 2 == 1)
    assert {sid for sid, _ in scored} == {2, 4}
    assert carried["r0"][0] == ()  # a one-token prompt: nothing to score, but asked and sent


def test_update_rejects_prompt_logprobs_that_do_not_answer_the_plan():
    s = make_scheduler(budget=64)
    s.add_request(make_request("a", 5, prompt_logprobs=0))
    plan = s.schedule()
    (chunk,) = plan.chunks
    assert chunk.prompt_logprob_start == 0 and chunk.prompt_logprob_targets == (11, 12, 13, 14)
    sampled = (SampledToken(0, 100),)
    with pytest.raises(ValueError, match="missing or unexpected"):
        s.update(plan, StepResult(plan.step_id, sampled))
    wrong = ChunkPromptLogprobs(0, (PromptLogprob(11, -1.0, 1),))
    with pytest.raises(ValueError, match="do not match"):
        s.update(plan, StepResult(plan.step_id, sampled, (wrong,)))
    assert s.running[0].num_computed_tokens == 0 and s.running[0].prompt_logprobs == []
    events = s.update(plan, _answer(plan, {}))
    assert len(events[0].prompt_logprobs) == 4
