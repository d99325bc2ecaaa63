"""A migrated request (`Request.generated`): an attention worker given the tokens a request had
generated elsewhere continues with exactly the tokens and log-probabilities of an undisturbed
run, for greedy, seeded, penalised and structured sampling, cut at any point."""

from __future__ import annotations

import pytest

from afdserve import LLM
from afdserve.types import Request, SamplingParams, StructuredOutput

PROMPT = (5, 9, 200, 17, 3, 88)
N = 16

PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, logprobs=2),
    "seeded": SamplingParams(temperature=1.0, seed=7, max_tokens=N, ignore_eos=True, logprobs=2),
    "penalties": SamplingParams(
        temperature=0.8,
        seed=3,
        max_tokens=N,
        ignore_eos=True,
        presence_penalty=0.7,
        frequency_penalty=0.4,
        repetition_penalty=1.3,
        min_tokens=N - 2,
    ),
    "structured": SamplingParams(
        temperature=1.0,
        seed=11,
        max_tokens=N,
        structured=StructuredOutput("regex", r"[a-z]{3,30}"),
    ),
}


def _run(worker, request: Request) -> list[tuple[int, float | None, object]]:
    worker.add_request(request)
    out = []
    while worker.has_unfinished():
        for ev in worker.step() or []:
            out.append((ev.token_id, ev.logprob, ev.finish_reason))
    return out


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    with LLM(str(tiny_model_dirs["llama"]), mode="aggregated", batch_invariant=True) as llm:
        yield llm


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_a_resumed_request_continues_as_if_undisturbed(llm, kind):
    worker = llm.engine.workers[0]
    params = PARAMS[kind]
    whole = _run(worker, Request("whole", PROMPT, params, sampling_seed=params.seed or 0))
    assert len(whole) >= 4
    tokens = [t for t, _, _ in whole]
    for cut in (1, len(whole) // 2, len(whole) - 1):
        rid = f"cut{cut}"
        rest = _run(
            worker,
            Request(rid, PROMPT, params, sampling_seed=params.seed or 0, generated=tokens[:cut]),
        )
        assert rest == whole[cut:], (kind, cut)


def test_resume_is_counted_against_the_context(llm):
    worker = llm.engine.workers[0]
    room = worker.max_model_len - len(PROMPT)
    from afdserve.errors import UserInputError

    with pytest.raises(UserInputError, match="with what it generated"):
        worker.add_request(Request("long", PROMPT, PARAMS["greedy"], generated=[1] * (room + 1)))
