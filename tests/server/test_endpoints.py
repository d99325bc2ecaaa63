"""The vLLM-parity routes and options: /tokenize, /detokenize, /tokenizer_info (as lm-eval's
remote tokenizer calls them), GET /v1/models/{id}, /ping, --api-key, --chat-template with
chat_template_kwargs, continue_final_message and echo on chat, --max-request-bytes, and
tokenisation / template rendering off the event loop (a huge prompt does not hold /health)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jinja2
import openai
import pytest

from afdserve.model.byte_tokenizer import CHATML_TEMPLATE
from afdserve.server.state import FrontOptions
from tests.server.conftest import SERVED, LiveServer, live_server
from tests.server.test_errors import _assert_error

KEY, KEY2 = "sk-afd-test-1", "sk-afd-test-2"
AUTH = {"Authorization": f"Bearer {KEY}"}
NO_THINK = "<think>\n\n</think>\n\n"
# ChatML plus Qwen3's switch: enable_thinking=false writes an empty think block
THINK_TEMPLATE = (
    CHATML_TEMPLATE + "{%- if add_generation_prompt and enable_thinking is defined and not "
    "enable_thinking %}{{- '" + NO_THINK.replace("\n", "\\n") + "' }}{%- endif %}"
)
LIMIT = 64 * 1024
CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def configured() -> Iterator[LiveServer]:
    """Every front option on: two API keys, a --chat-template, requests' own templates
    trusted, /tokenizer_info, a 64 KiB body limit."""
    front = FrontOptions(
        api_keys=(KEY, KEY2),
        chat_template=THINK_TEMPLATE,
        trust_request_chat_template=True,
        enable_tokenizer_info_endpoint=True,
        max_request_bytes=LIMIT,
    )
    with live_server(mode="aggregated", attention_workers=1, front=front) as s:
        yield s


# ---- /tokenize, /detokenize, /tokenizer_info --------------------------------------------------


def test_tokenize_and_detokenize_a_prompt(afd_server):
    tok = afd_server.serving.tokenizer
    text = "Hello the world"
    with afd_server.http() as h:
        r = h.post("/tokenize", json={"model": SERVED, "prompt": text, "return_token_strs": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == tok.encode(text) and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == afd_server.engine.max_model_len
        assert body["token_strs"] == tok.token_strs(body["tokens"])
        assert "".join(body["token_strs"]).replace("Ġ", " ") == text
        plain = h.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert plain["tokens"] == body["tokens"]  # the built-in tokenizer adds none
        assert plain["token_strs"] is None
        back = h.post("/detokenize", json={"tokens": body["tokens"]})
        assert back.status_code == 200 and back.json() == {"prompt": text}
        special = h.post("/detokenize", json={"tokens": [tok.eos_token_id]}).json()
        assert special["prompt"] == tok.eos_token  # kept, as vLLM's /detokenize keeps them
        _assert_error(h.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
        _assert_error(h.post("/detokenize", json={"tokens": ["a"]}), 400, "tokens")
        _assert_error(h.post("/tokenize", json={"prompt": 5}), 400, "prompt")
        _assert_error(h.post("/tokenize", json={}), 400, "prompt")
        _assert_error(h.post("/tokenize", json={"model": "gpt-4", "prompt": "x"}), 404, "model")
        _assert_error(h.post("/detokenize", json={"model": "x", "tokens": [1]}), 404, "model")


def test_tokenize_chat_messages_is_the_chat_prompt(afd_server):
    tok = afd_server.serving.tokenizer
    with afd_server.http() as h:
        r = h.post("/tokenize", json={"messages": CHAT})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == tok.encode(tok.apply_chat_template(CHAT))
        chat = h.post(
            "/v1/chat/completions",
            json={"messages": CHAT, "max_tokens": 1, "return_token_ids": True},
        ).json()
        assert chat["choices"][0]["prompt_token_ids"] == r.json()["tokens"]
        bare = h.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False})
        assert bare.json()["tokens"] == tok.encode(tok.apply_chat_template(CHAT, False))
        both = {"messages": CHAT, "continue_final_message": True}  # add_generation_prompt: true
        _assert_error(h.post("/tokenize", json=both), 400, "continue_final_message")
        _assert_error(h.post("/tokenize", json={"messages": []}), 400, "messages")
        tools = {"messages": CHAT, "tools": [{"type": "function"}]}
        _assert_error(h.post("/tokenize", json=tools), 400, "tools")


def test_tokenizer_info_is_off_unless_enabled(afd_server):
    with afd_server.http() as h:
        _assert_error(h.get("/tokenizer_info"), 404)


def test_tokenizer_info_serves_lm_eval_remote_tokenizer(configured):
    """What lm-eval's RemoteTokenizer (tokenizer_backend="remote") does, call for call: it
    checks /tokenizer_info has eos_token, encodes with add_special_tokens false, takes
    encode(eos_token)[0] as the EOS id, decodes with /detokenize, and renders chats itself
    with the chat_template it read."""
    tok = configured.serving.tokenizer
    with configured.http() as h:  # no API key: these routes are open, as in vLLM
        info = h.get("/tokenizer_info")
        assert info.status_code == 200, info.text
        info = info.json()
        assert info["eos_token"] == tok.eos_token == "<|im_end|>"
        assert info["bos_token"] is None and info["pad_token"] == "<|endoftext|>"
        assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert info["chat_template"] == THINK_TEMPLATE  # the template this server renders with
        assert info["added_tokens_decoder"]["383"] == "<|im_end|>"  # token objects as text
        assert "vocab_file" not in info and "merges_file" not in info

        def encode(text: str) -> list[int]:
            r = h.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
            return r.json()["tokens"]

        assert encode(info["eos_token"])[0] == tok.eos_token_id
        ids = encode("The quick brown fox")
        assert h.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "The quick brown fox"
        client_side = jinja2.Environment().from_string(info["chat_template"])
        rendered = client_side.render(messages=CHAT, add_generation_prompt=True)
        server_side = h.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
        assert encode(rendered) == server_side


# ---- models, ping -----------------------------------------------------------------------------


def test_get_model_by_id_and_404_in_openai_shape(afd_server):
    client = afd_server.openai()
    card = client.models.retrieve(SERVED)
    assert card.id == SERVED and card.object == "model"
    assert card.model_extra["max_model_len"] == afd_server.engine.max_model_len
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with afd_server.http() as h:
        err = _assert_error(h.get("/v1/models/org/no-such-model"), 404, "model")
        assert "org/no-such-model" in err["message"] and err["type"] == "NotFoundError"


def test_ping_get_and_post_as_health(afd_server):
    with afd_server.http() as h:
        for method in ("GET", "POST"):
            r = h.request(method, "/ping")
            assert r.status_code == 200 and r.content == b""
        assert h.put("/ping").status_code == 405


# ---- --api-key --------------------------------------------------------------------------------


V1_ROUTES = [
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{SERVED}", None),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
    ("GET", "/v1/no-such-route", None),
    ("GET", "/admin/workers", None),  # the operator's routes too
]


@pytest.mark.parametrize(("method", "path", "body"), V1_ROUTES, ids=[p for _, p, _ in V1_ROUTES])
def test_api_key_guards_every_v1_route(configured, method, path, body):
    with configured.http() as h:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            err = _assert_error(h.request(method, path, json=body, headers=headers), 401, None)
            assert err["type"] == "AuthenticationError"
        for key in (KEY, KEY2):
            r = h.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == (404 if "no-such" in path else 200), r.text


def test_api_key_leaves_health_metrics_and_tokenizer_open(configured):
    with configured.http() as h:
        assert h.get("/health").status_code == 200
        assert h.get("/ping").status_code == 200 and h.post("/ping").status_code == 200
        assert h.get("/metrics").status_code == 200 and h.get("/version").status_code == 200
        assert h.post("/tokenize", json={"prompt": "x"}).status_code == 200
        assert h.post("/detokenize", json={"tokens": [65]}).status_code == 200
        assert h.options("/v1/models").status_code != 401  # CORS preflights pass
    client = openai.OpenAI(base_url=configured.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    client = openai.OpenAI(base_url=configured.base_url + "/v1", api_key=KEY2, max_retries=0)
    assert client.models.list().data[0].id == SERVED


def test_bench_sends_the_api_key_from_the_environment(configured, monkeypatch, capsys):
    from afdserve.cli import main

    argv = ["bench", "--base-url", configured.base_url, "--num-prompts", "2"]
    argv += ["--random-input-len", "4", "--random-output-len", "2", "--disable-tqdm"]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("AFDSERVE_API_KEY", KEY2)
    assert main(argv) == 0, capsys.readouterr()
    assert "Successful requests:                     2" in capsys.readouterr().out


def test_serve_flags_api_key_env_and_chat_template(monkeypatch, tmp_path):
    from afdserve.cli import build_parser
    from afdserve.errors import UserInputError
    from afdserve.server.cli import load_chat_template, serving_options

    def options(*argv: str) -> FrontOptions:
        return serving_options(build_parser().parse_args(["serve", *argv]))

    monkeypatch.delenv("AFDSERVE_API_KEY", raising=False)
    assert options().api_keys == ()
    monkeypatch.setenv("AFDSERVE_API_KEY", "from-env")
    assert options().api_keys == ("from-env",)
    assert options("--api-key", "a", "--api-key", "b").api_keys == ("a", "b")  # the flag wins
    with pytest.raises(UserInputError, match="--api-key"):
        options("--api-key", "")
    with pytest.raises(UserInputError, match="--max-request-bytes"):
        options("--max-request-bytes", "10")
    defaults = options()
    assert defaults.max_request_bytes == 16 * 2**20 == FrontOptions().max_request_bytes
    assert not defaults.enable_tokenizer_info_endpoint and not defaults.trust_request_chat_template
    on = options("--enable-tokenizer-info-endpoint", "--trust-request-chat-template")
    assert on.enable_tokenizer_info_endpoint and on.trust_request_chat_template
    path = tmp_path / "t.jinja"
    path.write_text(THINK_TEMPLATE)
    assert options("--chat-template", str(path)).chat_template == THINK_TEMPLATE
    assert load_chat_template(THINK_TEMPLATE) == THINK_TEMPLATE  # inline
    assert load_chat_template(None) is None
    with pytest.raises(UserInputError, match="no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(UserInputError, match="chat template"):
        load_chat_template("{% for m in messages %}")  # does not compile


# ---- chat templates: --chat-template, chat_template_kwargs, continue_final_message, echo ------


def test_chat_template_override_and_template_kwargs(configured):
    tok = configured.serving.tokenizer
    with configured.http(headers=AUTH) as h:
        default = h.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
        assert default == tok.encode(tok.apply_chat_template(CHAT))  # undefined: no think block
        body = {"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}}
        no_think = h.post("/tokenize", json=body).json()["tokens"]
        assert tok.decode(no_think) == tok.apply_chat_template(CHAT) + NO_THINK
        chat = h.post(
            "/v1/chat/completions",
            json={**body, "max_tokens": 1, "return_token_ids": True},
        ).json()
        assert chat["choices"][0]["prompt_token_ids"] == no_think
        own = {"messages": CHAT, "chat_template": "{{ messages[0]['content'] }}!"}
        assert tok.decode(h.post("/tokenize", json=own).json()["tokens"]) == "Why is the sky blue?!"
        clash = {"messages": CHAT, "chat_template_kwargs": {"messages": []}}
        _assert_error(h.post("/tokenize", json=clash), 400, "chat_template_kwargs")
        broken = {"messages": CHAT, "chat_template": "{% if %}", "max_tokens": 1}
        _assert_error(h.post("/v1/chat/completions", json=broken), 400)


def test_request_chat_template_needs_trust(afd_server):
    body = {"messages": CHAT, "chat_template": "{{ 'x' }}", "max_tokens": 1}
    with afd_server.http() as h:
        err = _assert_error(h.post("/v1/chat/completions", json=body), 400, "chat_template")
        assert "--trust-request-chat-template" in err["message"]
        _assert_error(h.post("/tokenize", json=body), 400, "chat_template")


def test_continue_final_message_and_echo(afd_server):
    tok = afd_server.serving.tokenizer
    prefix = "The sky is"
    messages = [*CHAT, {"role": "assistant", "content": prefix}]
    prompt = tok.apply_chat_template(messages, False, continue_final_message=True)
    assert prompt.endswith("assistant\n" + prefix)
    gen = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with afd_server.http() as h:
        want = h.post("/v1/completions", json={"prompt": prompt, **gen}).json()["choices"][0]
        body = {
            "messages": messages,
            "add_generation_prompt": False,
            "continue_final_message": True,
            **gen,
        }
        plain = h.post("/v1/chat/completions", json=body).json()
        assert plain["choices"][0]["message"]["content"] == want["text"]
        assert plain["usage"]["prompt_tokens"] == len(tok.encode(prompt))
        echoed = h.post("/v1/chat/completions", json={**body, "echo": True}).json()
        assert echoed["choices"][0]["message"]["content"] == prefix + want["text"]
        assert echoed["usage"] == plain["usage"]
        both = {**body, "add_generation_prompt": True}
        _assert_error(h.post("/v1/chat/completions", json=both), 400, "continue_final_message")
        # echo when the last message is not the assistant's: nothing to echo
        user_last = h.post(
            "/v1/chat/completions", json={"messages": CHAT, "echo": True, **gen}
        ).json()
        alone = h.post("/v1/chat/completions", json={"messages": CHAT, **gen}).json()
        assert user_last["choices"][0]["message"] == alone["choices"][0]["message"]
    stream = afd_server.openai().chat.completions.create(
        model=SERVED, messages=messages, stream=True, extra_body={**body, "echo": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].choices[0].delta.content == prefix  # the echo, before any token
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == prefix + want["text"]


# ---- the event loop stays free; body and prompt limits ----------------------------------------


@pytest.fixture
def gate(afd_server):
    """gate(name): hold the serving tokenizer's method `name` on huge inputs (over 1 M
    characters) until released; yields (started, release, calls)."""
    tok = afd_server.serving.tokenizer
    patched: list[str] = []
    release = threading.Event()

    def install(name: str):
        real = getattr(tok, name)
        started = threading.Event()
        calls: list[int] = []

        def held(first, *args, **kwargs):
            size = len(first) if isinstance(first, str) else sum(len(m["content"]) for m in first)
            calls.append(size)
            if size > 1_000_000:
                started.set()
                assert release.wait(60), "test never released the tokenizer"
            return real(first, *args, **kwargs)

        setattr(tok, name, held)  # an instance attribute shadows the method
        patched.append(name)
        return started, calls

    try:
        yield install, release
    finally:
        release.set()
        for name in patched:
            delattr(tok, name)


def test_tokenising_a_2mb_prompt_leaves_health_and_streams_free(afd_server, gate):
    install, release = gate
    started, calls = install("encode")
    big = "The sky is blue because the air scatters blue light. " * 40_000  # 2.1 MB
    with afd_server.http() as h, ThreadPoolExecutor(1) as pool:
        fut = pool.submit(h.post, "/tokenize", json={"prompt": big})
        try:
            assert started.wait(60), "the big prompt never reached the tokenizer"
            # the big prompt is being tokenised right now (held): the loop still answers (a
            # loop blocked in the tokenizer would not, and the client would time out)
            with afd_server.http(timeout=15) as other:
                assert other.get("/health").status_code == 200
                small = other.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert small.status_code == 200  # tokenised on the other tokenizer thread
            assert not fut.done()
        finally:
            release.set()
        resp = fut.result(timeout=120)
    assert resp.status_code == 200, resp.text[:200]
    assert resp.json()["count"] == len(afd_server.serving.tokenizer.encode(big))


def test_rendering_a_huge_chat_is_off_the_loop_and_too_long_text_is_refused_early(afd_server, gate):
    install, release = gate
    started, _ = install("apply_chat_template")
    _, encoded = install("encode")
    big = "blue " * 400_000  # 2 MB: far more than the context's 2048 tokens can hold
    messages = [{"role": "user", "content": big}]
    with afd_server.http() as h, ThreadPoolExecutor(1) as pool:
        fut = pool.submit(h.post, "/v1/chat/completions", json={"messages": messages})
        try:
            assert started.wait(60)
            with afd_server.http(timeout=15) as other:
                assert other.get("/health").status_code == 200  # while the template renders
        finally:
            release.set()
        err = _assert_error(fut.result(timeout=120), 400, "messages")
        assert "maximum context length" in err["message"]
        err = _assert_error(h.post("/v1/completions", json={"prompt": big}), 400, "prompt")
        assert "maximum context length" in err["message"]
    assert not [n for n in encoded if n > 1_000_000]  # refused without being tokenised
    st = afd_server.serving
    edge = "a" * (st.max_model_len * st.tokenizer.max_token_chars)  # at the bound: tokenised
    with afd_server.http() as h:
        _assert_error(h.post("/v1/completions", json={"prompt": edge}), 400, "prompt")
    assert encoded[-1] == len(edge)


def test_body_over_max_request_bytes_is_413(configured):
    big = {"prompt": "x" * LIMIT, "max_tokens": 1}
    with configured.http(headers=AUTH) as h:
        err = _assert_error(h.post("/v1/completions", json=big), 413, None)
        assert str(LIMIT) in err["message"]
        _assert_error(h.post("/tokenize", json=big), 413, None)

        def chunked():  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(LIMIT // 1024 + 1):
                yield b"x" * 1024
            yield b'"}'

        _assert_error(h.post("/tokenize", content=chunked()), 413, None)
        fits = {"prompt": "x" * (LIMIT - 100)}
        assert h.post("/tokenize", json=fits).status_code == 200


def test_oversized_bodies_are_413_while_another_stream_goes_on(configured):
    # the 40 MB prompt at CI size: bodies 4x the configured limit, declared and
    # chunked, refused while a stream is in flight (held between steps, so it is); the stream
    # then runs to its end and the service still answers
    big = {"prompt": "The sky is blue. " * (4 * LIMIT // 17), "max_tokens": 1}

    def chunked():
        yield b'{"prompt": "'
        for _ in range(4 * LIMIT // 1024):
            yield b"x" * 1024
        yield b'"}'

    body = {"prompt": [5, 6, 7], "max_tokens": 12, "ignore_eos": True, "stream": True}
    body["return_token_ids"] = True
    with configured.http(headers=AUTH) as h, configured.http(headers=AUTH) as other:
        with h.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            with configured.held_engine() as gate:
                for route in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
                    _assert_error(other.post(route, json=big), 413, None)
                    _assert_error(other.post(route, content=chunked()), 413, None)
                assert other.get("/health").status_code == 200
                assert configured.serving.async_engine.num_in_flight == 1
                gate.set()
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        chunks = [json.loads(first[6:])] + [json.loads(e) for e in rest[:-1]]
        assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 12
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        ok = other.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
