"""The in-process engine and worker processes over every transport are two placements of one
runtime: the same requests give the same token events, every field of every one (token,
finished, finish reason, logprob, top logprobs, prompt logprobs), and the same OpenAI responses
(n=2, stop strings, logprobs=5, penalties and logit_bias, echo with prompt logprobs) through the
server.

Both run the exact (batch-invariant) kernels, so that how the FFN worker happens to batch the
attention workers' rows cannot change a bit; requests without a seed get theirs from the
front's generator (seeded by the config) in arrival order, as in both placements.
"""

from __future__ import annotations

import time

import pytest

from afdserve import LLM, SamplingParams
from afdserve.types import StructuredOutput, TokenEvent
from tests.launch.test_multiprocess import _transports
from tests.server.conftest import live_server

ENGINE = dict(mode="afd", attention_workers=2, microbatches=2, batch_invariant=True, seed=11)
REQUESTS = [
    (
        [5, 9, 200],
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=5, prompt_logprobs=3),
    ),
    (
        [7] * 21,
        SamplingParams(
            temperature=0.8, top_p=0.9, max_tokens=12, seed=4, logprobs=5, prompt_logprobs=0
        ),
    ),
    ([1], SamplingParams(temperature=1.0, top_k=20, max_tokens=7, logprobs=0)),  # front's seed
    ([100, 101, 102, 103], SamplingParams(temperature=0.6, max_tokens=6, stop_token_ids=(17,))),
    ([42] * 5, SamplingParams(temperature=0, max_tokens=5)),  # no logprobs asked
    # the token history lives in each attention worker: penalties, min_p ...
    ([9, 8, 7, 9, 8], SamplingParams(
        temperature=0.9, seed=8, max_tokens=10, ignore_eos=True, presence_penalty=1.0,
        frequency_penalty=0.5, repetition_penalty=1.3, min_p=0.05, logprobs=2,
    )),
    # ... and min_tokens masks the model's EOS ids (383, 381), which the bias makes certain
    ([3, 3, 3], SamplingParams(
        temperature=0, max_tokens=9, logit_bias={383: 60.0, 50: 2.0}, min_tokens=4,
    )),
    # the grammar state of structured outputs lives in each attention worker too
    ([11, 12], SamplingParams(temperature=0.9, seed=2, max_tokens=40, logprobs=1, structured=(
        StructuredOutput("json_schema", {
            "type": "object", "properties": {"n": {"type": "integer", "maximum": 999}},
            "required": ["n"], "additionalProperties": False,
        })
    ))),
    ([13], SamplingParams(temperature=0, max_tokens=12, structured=(
        StructuredOutput("regex", "[a-f]{2,6}-[0-9]")
    ))),
]  # fmt: skip


def _events(model_dir, **placement) -> dict[str, list[TokenEvent]]:
    with LLM(str(model_dir), **ENGINE, **placement) as llm:
        engine = llm.engine
        for i, (prompt, params) in enumerate(REQUESTS):
            engine.add_request(f"r{i}", prompt, params)
        out: dict[str, list[TokenEvent]] = {f"r{i}": [] for i in range(len(REQUESTS))}
        deadline = time.monotonic() + 120
        while engine.has_unfinished():
            assert time.monotonic() < deadline, "requests did not finish within 120 s"
            for ev in engine.step():
                out[ev.request_id].append(ev)
        return out


@pytest.fixture(scope="module")
def in_process(tiny_model_dirs):
    return _events(tiny_model_dirs["qwen3-moe"], transport="local")


@pytest.mark.parametrize("transport", _transports())
def test_token_events_are_identical_in_every_placement(tiny_model_dirs, in_process, transport):
    got = _events(tiny_model_dirs["qwen3-moe"], transport=transport)
    assert got == in_process
    lp = [ev for ev in in_process["r0"]]
    assert all(len(ev.top_logprobs) == 5 and ev.logprob is not None for ev in lp)  # asked for
    assert all(ev.top_logprobs == () for ev in in_process["r3"] + in_process["r4"])
    assert in_process["r4"][-1].finished and all(len(v) for v in in_process.values())
    assert [ev.token_id for ev in in_process["r6"]][4:] == [383]  # EOS, right after min_tokens
    assert not {381, 383} & {ev.token_id for ev in in_process["r6"][:4]}
    # prompt logprobs: on the first event only, one per prompt token after the first
    first = in_process["r0"][0].prompt_logprobs
    assert [e.token_id for e in first] == [9, 200] and all(len(e.top_logprobs) == 3 for e in first)
    assert len(in_process["r1"][0].prompt_logprobs) == 20
    assert all(e.top_logprobs == () for e in in_process["r1"][0].prompt_logprobs)
    assert all(ev.prompt_logprobs is None for v in in_process.values() for ev in v[1:])
    assert all(v[0].prompt_logprobs is None for k, v in in_process.items() if k in ("r2", "r3"))
    assert [ev.finish_reason for ev in in_process["r7"] + in_process["r8"] if ev.finished] == [
        "stop",
        "stop",
    ]  # both grammars completed


def _completions(client) -> list[dict]:
    kw = dict(model="tiny", max_tokens=8, seed=5, logprobs=5)
    return [
        client.completions.create(prompt="The quick brown fox", n=2, temperature=0.9, **kw),
        client.completions.create(prompt=[5, 9, 200, 17], temperature=0, stop=["e", " t"], **kw),
        client.completions.create(
            prompt="The lazy dog", temperature=0.7, presence_penalty=1.2, frequency_penalty=0.4,
            logit_bias={"100": 4.0}, extra_body={"repetition_penalty": 1.2, "min_tokens": 3},
            **kw,
        ),
        # lm-eval's loglikelihood request: the prompt's logprobs, echoed
        client.completions.create(
            model="tiny",
            prompt=[[5, 9, 200, 17], [3, 4]],
            max_tokens=1,
            temperature=0,
            logprobs=1,
            echo=True,
            seed=1234,
        ),
    ]  # fmt: skip


def test_server_responses_are_identical_over_worker_processes():
    # the server's own model (builtin:tiny-qwen3-moe); n=2 and stop strings live in the front,
    # logprobs' alternatives cross the control plane from the worker processes
    with live_server(**ENGINE, transport="local") as s:
        want = [r.model_dump(exclude={"id", "created"}) for r in _completions(s.openai())]
    with live_server(**ENGINE, transport="shm") as s:
        got = [r.model_dump(exclude={"id", "created"}) for r in _completions(s.openai())]
    assert got == want
    assert len(want[0]["choices"]) == 2
    assert all(len(t) == 5 for t in want[0]["choices"][0]["logprobs"]["top_logprobs"])
    echoed = want[3]["choices"][0]["logprobs"]
    assert echoed["token_logprobs"][0] is None and len(echoed["token_logprobs"]) == 5
