"""HF model directories as they come, through the OpenAI server (live, in-process, tiny models):
a padded vocabulary streams without an error, a directory without tokenizer files serves token-id
prompts (and refuses text clearly), chat uses chat_template.jinja as HF renders it, and
generation_config.json's sampling defaults fill what a request leaves out. The LLM and tokenizer
halves are in tests/afd/test_llm_hf_dirs.py and tests/model/test_hf_dirs.py."""

from __future__ import annotations

import json

import pytest

from afdserve.cli import build_parser
from afdserve.model.byte_tokenizer import VOCAB_SIZE
from afdserve.model.text_stream import TextStream
from afdserve.server.cli import serve_config
from afdserve.server.protocol import CompletionRequest
from tests.hf_dirs import (
    PAD,
    TOKENIZER_FILES,
    copy_model,
    edit_json,
    padded_vocab_model,
    with_jinja_template,
)
from tests.server.conftest import live_server

transformers = pytest.importorskip("transformers")

ONE = dict(mode="aggregated", attention_workers=1, microbatches=1)
MESSAGES = [
    {"role": "system", "content": "Be terse 🌤"},
    {"role": "user", "content": "Why is the sky blue?"},
]


def _sse(response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[len("data: ") :]))
    return events


def test_padded_vocab_ids_stream_as_empty_text(tmp_path):
    d = padded_vocab_model(tmp_path / "padded")
    with live_server(str(d), **ONE) as srv, srv.http() as http:
        body = {"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        body |= {"return_token_ids": True, "logprobs": 2}
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = _sse(r)
        assert not any("error" in e for e in events), events
        ids = [t for e in events for c in e["choices"] for t in c.get("token_ids") or ()]
        assert len(ids) == 5 and all(t >= VOCAB_SIZE for t in ids)
        assert "".join(c["text"] for e in events for c in e["choices"]) == ""
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        r = http.post("/v1/completions", json=body)  # and not streaming, logprobs and all
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == ids and choice["text"] == ""
        assert choice["logprobs"]["tokens"] == [""] * 5
        chat = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "logprobs": True}
        r = http.post("/v1/chat/completions", json=chat | {"stream": True, "top_logprobs": 2})
        events = _sse(r)
        assert r.status_code == 200 and not any("error" in e for e in events), events
        content = [
            lp
            for e in events
            for c in e["choices"]
            for lp in (c.get("logprobs") or {}).get("content") or ()
        ]
        assert [lp["bytes"] for lp in content] == [[]] * 3
        assert http.get("/v1/models").json()["data"][0]["vocab_size"] == VOCAB_SIZE


def test_token_id_prompts_without_a_tokenizer(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir("qwen3-moe"), tmp_path / "no-tokenizer", drop=TOKENIZER_FILES)
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with live_server(str(d), **ONE) as srv, srv.http() as http:
        r = http.post("/v1/completions", json=body | {"return_token_ids": True})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert len(choice["token_ids"]) == 4 and choice["text"] == ""
        with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as s:
            events = _sse(s)
        assert not any("error" in e for e in events) and events[-1]["choices"][0]["text"] == ""
        for path, req, match in [
            ("/v1/completions", body | {"prompt": "hello"}, "a text prompt"),
            ("/v1/completions", body | {"stop": ["x"]}, "stop strings"),
            ("/v1/chat/completions", {"messages": MESSAGES}, "chat"),
            ("/tokenize", {"prompt": "hello"}, "a text prompt"),
            ("/tokenize", {"messages": MESSAGES}, "chat"),
        ]:
            r = http.post(path, json=req)
            assert r.status_code == 400, r.text
            msg = r.json()["error"]["message"]
            assert match in msg and "needs a tokenizer" in msg and "no tokenizer.json" in msg
        assert http.post("/detokenize", json={"tokens": [5, 6]}).json() == {"prompt": ""}
        models = http.get("/v1/models").json()["data"][0]
        assert models["vocab_size"] == srv.engine.vocab_size
        assert srv.wait_idle().num_running == 0


def test_serve_has_skip_tokenizer_init():
    args = build_parser().parse_args(["serve", "--skip-tokenizer-init"])
    assert serve_config(args).skip_tokenizer_init is True
    assert serve_config(build_parser().parse_args(["serve"])).skip_tokenizer_init is False


def test_chat_uses_chat_template_jinja_as_hf(tiny_model_dir, tmp_path):
    d = with_jinja_template(tiny_model_dir("qwen3-moe"), tmp_path / "jinja")
    hf = transformers.AutoTokenizer.from_pretrained(d)
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    want = hf(text, add_special_tokens=False)["input_ids"]
    assert text.startswith('SYSTEM "Be terse 🌤"\n[1] user:')
    with live_server(str(d), **ONE) as srv, srv.http() as http:
        chat = {"messages": MESSAGES, "max_tokens": 2, "return_token_ids": True}
        r = http.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["prompt_token_ids"] == want


def test_generation_config_sampling_defaults_fill_what_a_request_leaves_out(
    tiny_model_dir, tmp_path
):
    d = copy_model(tiny_model_dir("qwen2"), tmp_path / "gen-defaults")
    edit_json(d / "generation_config.json", lambda g: g.update(top_k=1, temperature=0.7))
    body = {"prompt": [5, 6, 7], "max_tokens": 6, "ignore_eos": True, "return_token_ids": True}
    with live_server(str(d), **ONE) as srv, srv.http() as http:
        assert srv.serving.async_engine.sampling_defaults == {"top_k": 1, "temperature": 0.7}
        greedy = http.post("/v1/completions", json=body | {"temperature": 0}).json()
        for seed in (1, 2):  # top_k 1 from generation_config: any seed gives the greedy tokens
            r = http.post("/v1/completions", json=body | {"seed": seed}).json()
            assert r["choices"][0]["token_ids"] == greedy["choices"][0]["token_ids"]
            # null is leaving it out: generation_config's top_k and temperature again
            nulls = {"seed": seed, "top_k": None, "temperature": None, "top_p": None}
            r = http.post("/v1/completions", json=body | nulls).json()
            assert r["choices"][0]["token_ids"] == greedy["choices"][0]["token_ids"]


def test_request_fields_win_over_sampling_defaults():
    defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 9}
    req = CompletionRequest.model_validate({"prompt": [1], "top_k": 0, "temperature": 1.0})
    p = req.sampling_params(4, None, 0, defaults)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 0.8, 0, 4)
    p = CompletionRequest.model_validate({"prompt": [1]}).sampling_params(4, None, 0)
    assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, 0)


def test_text_stream_skips_ids_past_the_tokenizer(tiny_model_dir):
    from afdserve.model.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model_dir("qwen2"))
    ts = TextStream(tok, stop=["!?"])
    for t in [72, VOCAB_SIZE, 105, VOCAB_SIZE + PAD - 1, 33]:
        ts.push(t)
    ts.finish()
    assert ts.take(final=True) == "Hi!" and not ts.stopped
