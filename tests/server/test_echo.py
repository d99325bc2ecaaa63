"""`echo`, `max_tokens: 0` and vLLM's `prompt_logprobs` against a live AFD (2A1F) server: what
lm-eval's loglikelihood requests (`echo: true, logprobs: 1, max_tokens: 1`, older clients
`max_tokens: 0`) get back, in vLLM's shape, with values equal to the offline engine's and to HF
transformers' log-softmax on the same weights (fp32, within HF_TOL)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.server.conftest import SERVED

transformers = pytest.importorskip("transformers")

HF_TOL = 1e-4
IDS = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]


@pytest.fixture(scope="module")
def hf(afd_server):
    """ids -> HF's [n, V] log_softmax of the logits at every position (fp32)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        afd_server.serving.model_root, dtype=torch.float32
    ).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return run


def _decode(afd_server, ids) -> list[str]:
    return [afd_server.serving.tokenizer.decode([t]) for t in ids]


def _post(afd_server, path: str = "/v1/completions", **body) -> dict:
    with afd_server.http() as h:
        r = h.post(path, json={"model": SERVED, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_logprobs_have_vllms_shape_and_hfs_values(afd_server, oracle, hf):
    """lm-eval's request: the prompt's tokens then the one generated, the first with null."""
    body = dict(prompt=IDS, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234)
    (choice,) = _post(afd_server, **body)["choices"]
    plain = oracle(IDS, max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1)
    lp = choice["logprobs"]
    tokens = _decode(afd_server, IDS + plain.token_ids)
    assert choice["text"] == afd_server.serving.tokenizer.decode(IDS) + plain.text
    assert lp["tokens"] == tokens
    assert lp["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # the prompt's: the offline engine's values exactly, HF's within HF_TOL
    want = [plain.prompt_logprobs[j][t].logprob for j, t in enumerate(IDS) if j]
    assert lp["token_logprobs"][1 : len(IDS)] == want
    ref = hf(IDS)
    diffs = [abs(lp["token_logprobs"][j] - ref[j - 1, t].item()) for j, t in enumerate(IDS) if j]
    print(f"echo: max |prompt logprob - HF| = {max(diffs):.3g}")
    assert max(diffs) <= HF_TOL
    # top_logprobs: the prompt token, then the most likely (one entry if it is the most likely)
    for j in range(1, len(IDS)):
        top = lp["top_logprobs"][j]
        assert next(iter(top)) == tokens[j] and 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(ref[j - 1].max().item(), abs=HF_TOL)
    # then the generated token, as without echo
    assert lp["token_logprobs"][-1] == plain.logprobs[0]
    # vLLM's prompt_logprobs field: null, then {id: {logprob, rank, decoded_token}}
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(IDS) and plp[0] is None
    for j in range(1, len(IDS)):
        first_id, first = next(iter(plp[j].items()))
        assert first_id == str(IDS[j]) and first["decoded_token"] == tokens[j]
        assert first["logprob"] == lp["token_logprobs"][j]
        assert first["rank"] == plain.prompt_logprobs[j][IDS[j]].rank >= 1
        assert {int(k) for k in plp[j]} == set(plain.prompt_logprobs[j])


def test_echo_max_tokens_0_returns_the_prompt_alone(afd_server):
    """Older lm-eval clients: the prompt's text and logprobs, nothing generated."""
    full = _post(afd_server, prompt=IDS, echo=True, logprobs=2, max_tokens=1, temperature=0)
    resp = _post(afd_server, prompt=IDS, echo=True, logprobs=2, max_tokens=0)
    (choice,) = resp["choices"]
    assert choice["text"] == afd_server.serving.tokenizer.decode(IDS)
    lp, want = choice["logprobs"], full["choices"][0]["logprobs"]
    assert {k: v[:-1] for k, v in want.items()} == lp  # the echo of max_tokens 1, less its token
    assert choice["finish_reason"] == "length"
    assert resp["usage"] == {"prompt_tokens": len(IDS), "completion_tokens": 0, "total_tokens": 11}
    # and through the openai client, with a text prompt
    c = afd_server.openai().completions.create(
        model=SERVED, prompt="Hello world", echo=True, max_tokens=0, logprobs=0
    )
    assert c.choices[0].text == "Hello world"
    assert c.choices[0].logprobs.token_logprobs[0] is None
    assert all(len(t) == 1 for t in c.choices[0].logprobs.top_logprobs[1:])  # the token alone


def test_echo_without_logprobs_prepends_the_text_only(afd_server, oracle):
    client = afd_server.openai()
    resp = client.completions.create(
        model=SERVED, prompt=["Hi there", "abc"], echo=True, max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    for c, p in zip(resp.choices, ["Hi there"] * 2 + ["abc"] * 2, strict=True):
        assert c.text == p + oracle(p, max_tokens=4, temperature=0).text
        assert c.logprobs is None and "prompt_logprobs" not in (c.model_extra or {})


def test_streamed_echo_equals_the_one_body_echo(afd_server):
    body = dict(prompt="The quick brown", echo=True, logprobs=1, max_tokens=5, temperature=0)
    (want,) = _post(afd_server, **body, ignore_eos=True)["choices"]
    text, lps = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with afd_server.http() as h:
        with h.stream(
            "POST", "/v1/completions", json={**body, "stream": True, "ignore_eos": True}
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for c in json.loads(line[6:])["choices"]:
                    text += c["text"]
                    for k in lps:
                        lps[k] += c["logprobs"][k]
    assert text == want["text"] and text.startswith("The quick brown")
    assert lps == want["logprobs"]


def test_prompt_logprobs_field_on_completions_and_chat(afd_server, hf):
    # completions: the extension alone, without echo: the choice carries it, the text does not
    (choice,) = _post(afd_server, prompt=IDS, max_tokens=2, temperature=0, prompt_logprobs=3)[
        "choices"
    ]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(IDS) and plp[0] is None and choice["logprobs"] is None
    assert all(3 <= len(d) <= 4 for d in plp[1:])
    ref = hf(IDS)
    for j in range(1, len(IDS)):
        for tid, v in plp[j].items():
            assert v["logprob"] == pytest.approx(ref[j - 1, int(tid)].item(), abs=HF_TOL)
    # chat: beside the choices, as vLLM; over the templated prompt
    resp = _post(
        afd_server,
        "/v1/chat/completions",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        temperature=0,
        prompt_logprobs=0,
        n=2,
    )
    plp = resp["prompt_logprobs"]
    assert len(plp) == resp["usage"]["prompt_tokens"] and plp[0] is None
    assert all(len(d) == 1 for d in plp[1:])
    assert all("prompt_logprobs" not in c for c in resp["choices"])
    msgs = [{"role": "user", "content": "hi"}]
    plain = _post(afd_server, "/v1/chat/completions", messages=msgs, max_tokens=2)
    assert "prompt_logprobs" not in plain
