"""The official `openai` client against a live AFD (2A1F) server: completions and chat, streaming
and not, text and token-id prompts. Greedy (and seeded) results must equal the offline engine's
for the same prompts, token for token."""

from __future__ import annotations

import pytest

from tests.server.conftest import SERVED

PROMPTS = ["Hello there", "The quick brown fox jumps over", "def fibonacci(n):"]


def _ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def test_models_health_version(afd_server):
    with afd_server.http() as h:
        assert h.get("/health").status_code == 200
        assert h.get("/version").json()["version"]
    models = afd_server.openai().models.list()
    (card,) = models.data
    assert card.id == SERVED
    assert card.model_extra["max_model_len"] == afd_server.engine.max_model_len
    assert card.model_extra["vocab_size"] == 384


def test_completion_text_prompts_equal_offline_greedy(afd_server, oracle):
    client = afd_server.openai()
    for prompt in PROMPTS:
        resp = client.completions.create(
            model=SERVED,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        want = oracle(prompt, max_tokens=12, temperature=0, ignore_eos=True)
        (choice,) = resp.choices
        assert _ids(choice) == want.token_ids
        assert choice.text == want.text
        assert choice.finish_reason == "length"
        assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
        assert resp.usage.completion_tokens == 12


def test_completion_token_id_prompt_and_batch(afd_server, oracle):
    client = afd_server.openai()
    ids = [72, 101, 108, 108, 111, 32, 119]
    resp = client.completions.create(
        model=SERVED, prompt=ids, max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
    )
    want = oracle(ids, max_tokens=8, temperature=0)
    assert _ids(resp.choices[0]) == want.token_ids
    assert resp.choices[0].model_extra["prompt_token_ids"] == ids
    # a batch of prompts (text and ids mixed is not OpenAI's; two of each kind are)
    resp = client.completions.create(model=SERVED, prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    for c, p in zip(resp.choices, PROMPTS[:2], strict=True):
        assert c.text == oracle(p, max_tokens=6, temperature=0).text
    assert resp.usage.completion_tokens == sum(
        len(oracle(p, max_tokens=6, temperature=0).token_ids) for p in PROMPTS[:2]
    )


def test_completion_stream_equals_non_stream(afd_server, oracle):
    client = afd_server.openai()
    prompt = PROMPTS[1]
    want = oracle(prompt, max_tokens=16, temperature=0, ignore_eos=True)
    chunks = list(
        client.completions.create(
            model=SERVED,
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) >= 2  # flushed as produced, not in one piece
    assert "".join(c.choices[0].text for c in token_chunks) == want.text
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == 16
    assert usage.prompt_tokens == len(want.prompt_token_ids)


def test_chat_equals_offline_greedy_stream_and_not(afd_server, oracle):
    from afdserve.model.tokenizer import Tokenizer

    client = afd_server.openai()
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    prompt = Tokenizer(afd_server.serving.model_root).apply_chat_template(messages)
    want = oracle(prompt, max_tokens=10, temperature=0, ignore_eos=True)
    resp = client.chat.completions.create(
        model=SERVED,
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == want.text
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    stream = client.chat.completions.create(
        model=SERVED,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_without_max_tokens_uses_the_remaining_context(afd_server):
    resp = afd_server.openai().chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "hi"}],
        temperature=0,
        stop=["e"],  # ends early: no need to generate the whole context
    )
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text_stream_and_not(afd_server, oracle):
    client = afd_server.openai()
    prompt = PROMPTS[0]
    full = oracle(prompt, max_tokens=24, temperature=0, ignore_eos=True).text
    stop = full[5:8]
    assert stop and full.find(stop) >= 0
    expected = full[: full.find(stop)]
    resp = client.completions.create(
        model=SERVED,
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        stop=[stop, "@@never@@"],
        extra_body={"ignore_eos": True},
    )
    assert resp.choices[0].text == expected
    assert resp.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model=SERVED,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    afd_server.wait_idle()  # the engine request was aborted when the stop string matched


def test_stop_token_ids(afd_server, oracle):
    prompt = PROMPTS[2]
    full = oracle(prompt, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    stop_id = full[4]
    expected = full[: full.index(stop_id) + 1]  # the stop token is kept
    resp = afd_server.openai().completions.create(
        model=SERVED,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        extra_body={"stop_token_ids": [stop_id], "ignore_eos": True, "return_token_ids": True},
    )
    assert _ids(resp.choices[0]) == expected
    assert resp.choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_offline_and_repeats(afd_server, oracle):
    client = afd_server.openai()
    kw = dict(model=SERVED, prompt=PROMPTS[0], max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    a = client.completions.create(**kw, extra_body={"return_token_ids": True, "top_k": 50})
    b = client.completions.create(**kw, extra_body={"return_token_ids": True, "top_k": 50})
    want = oracle(PROMPTS[0], max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    assert _ids(a.choices[0]) == _ids(b.choices[0]) == want.token_ids


def test_n_choices_and_logprobs(afd_server, oracle):
    client = afd_server.openai()
    resp = client.completions.create(
        model=SERVED, prompt=PROMPTS[0], max_tokens=5, temperature=0, n=2, logprobs=3
    )
    assert [c.index for c in resp.choices] == [0, 1]
    want = oracle(PROMPTS[0], max_tokens=5, temperature=0, logprobs=3)
    for c in resp.choices:
        assert c.text == want.text
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
        assert all(len(t) <= 3 for t in lp.top_logprobs)
        # within rounding, not equal: in the fast mode a row's rounding depends on what else
        # its FFN batch holds, here the other choice, in step with it or not (timing)
        assert lp.token_logprobs == pytest.approx(want.logprobs, rel=0, abs=1e-5)
        assert all(v <= 0.0 for v in lp.token_logprobs)
    chat = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].logprob == content[0].top_logprobs[0].logprob  # greedy: the top choice


def test_penalties_logit_bias_min_p_min_tokens_equal_offline(afd_server, oracle):
    """The OpenAI fields (presence/frequency penalties, logit_bias with string keys) and vLLM's
    (repetition_penalty, min_p, min_tokens) reach the sampler: the same tokens as offline."""
    client = afd_server.openai()
    kw = dict(model=SERVED, prompt=PROMPTS[1], max_tokens=10, temperature=0.8, seed=3)
    resp = client.completions.create(
        **kw,
        presence_penalty=1.5,
        frequency_penalty=-0.5,
        logit_bias={"300": 3.0, "17": -100},
        extra_body={"repetition_penalty": 1.3, "min_p": 0.05, "min_tokens": 4,
                    "return_token_ids": True},
    )  # fmt: skip
    want = oracle(
        PROMPTS[1], max_tokens=10, temperature=0.8, seed=3, presence_penalty=1.5,
        frequency_penalty=-0.5, logit_bias={300: 3.0, 17: -100.0}, repetition_penalty=1.3,
        min_p=0.05, min_tokens=4,
    )  # fmt: skip
    assert _ids(resp.choices[0]) == want.token_ids
    plain = oracle(PROMPTS[1], max_tokens=10, temperature=0.8, seed=3)
    assert want.token_ids != plain.token_ids  # the fields did something
    forced = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        temperature=0,
        logit_bias={"77": 100},
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert _ids(forced.choices[0]) == [77] * 4


def _events(resp) -> list[dict]:
    import json

    assert resp.status_code == 200, resp.text
    lines = [ln[6:] for ln in resp.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


USAGE_CASES = [
    ("/v1/completions", {"prompt": PROMPTS[:2]}),  # two prompts, n = 2: four choices
    ("/v1/completions", {"prompt": PROMPTS[2]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Why?"}]}),
]


@pytest.mark.parametrize(("route", "prompt"), USAGE_CASES, ids=["batch", "one", "chat"])
def test_streamed_usage_equals_the_non_streamed_usage_with_n(afd_server, route, prompt):
    """The prompt counts once per prompt, not once per choice, streamed or not (the bug: 24
    prompt tokens streamed against 12); continuous_usage_stats puts each choice's usage so far
    on every chunk, as vLLM does."""
    body = {**prompt, "n": 2, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with afd_server.http() as h:
        want = h.post(route, json=body).json()["usage"]
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        events = _events(h.post(route, json=stream))
        assert events[-1]["choices"] == [] and events[-1]["usage"] == want
        assert all(e["usage"] is None for e in events[:-1])
        stream["stream_options"]["continuous_usage_stats"] = True
        events = _events(h.post(route, json=stream))
    assert events[-1]["choices"] == [] and events[-1]["usage"] == want
    so_far: dict[int, int] = {}
    for e in events[:-1]:
        (choice,) = e["choices"]
        u = e["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert u["completion_tokens"] >= so_far.get(choice["index"], 0)
        so_far[choice["index"]] = u["completion_tokens"]
    assert set(so_far.values()) == {4} and sum(so_far.values()) == want["completion_tokens"]
    n_choices = len(so_far)
    assert want["completion_tokens"] == 4 * n_choices
    if "chat" in route:
        assert n_choices == 2
        assert events[0]["usage"]["completion_tokens"] == 0  # the role chunk: nothing yet
        assert all(e["usage"]["prompt_tokens"] == want["prompt_tokens"] for e in events)
    else:
        assert n_choices == 2 * (len(prompt["prompt"]) if isinstance(prompt["prompt"], list) else 1)
