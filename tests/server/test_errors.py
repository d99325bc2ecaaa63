"""Every error status of the API, in OpenAI's shape: 400 (bad JSON, wrong types, bad ranges,
context overflow), 404 (unknown model), 429 (waiting queue full; the admitted requests still
complete), 503 (a worker is down: /health too), and 404 for unknown routes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from afdserve.afd.stats import EngineState, WorkerState
from afdserve.server.queue_limit import queued_beyond_slots
from tests.server.conftest import SERVED, live_server


def _assert_error(resp, status: int, param: str | None = "ANY") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]
    if param != "ANY":
        assert err["param"] == param, err
    return err


BAD_COMPLETIONS = [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 99999]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "x", "min_tokens": 17}, "min_tokens"),  # > max_tokens (16)
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"five": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"-5": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"384": 1}}, "logit_bias"),  # outside the vocabulary
    ({"prompt": "x", "logit_bias": [1, 2]}, "logit_bias"),
    ({"prompt": "x", "bad_words": ["no"]}, "bad_words"),
    ({"prompt": "x", "echo": True, "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "n": 0}, "n"),
]


@pytest.mark.parametrize(
    ("body", "param"), BAD_COMPLETIONS, ids=[str(b) for b, _ in BAD_COMPLETIONS]
)
def test_400_for_bad_completion_fields(afd_server, body, param):
    with afd_server.http() as h:
        _assert_error(h.post("/v1/completions", json=body), 400, param)


def test_400_malformed_json_and_wrong_body(afd_server):
    with afd_server.http() as h:
        for raw in (b"{not json", b"", b"\xff\xfe", b'{"prompt": "x",}'):
            _assert_error(h.post("/v1/completions", content=raw), 400, None)
        _assert_error(h.post("/v1/completions", json=[1, 2]), 400)
        _assert_error(h.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
        _assert_error(
            h.post("/v1/chat/completions", json={"messages": [{"content": "x"}]}), 400, "messages"
        )
        _assert_error(h.post("/v1/chat/completions", json={"messages": "hi"}), 400, "messages")
        msg = [{"role": "user", "content": "x"}]
        for extra in ({"prompt_logprobs": 1, "stream": True}, {"prompt_logprobs": 99}):
            _assert_error(
                h.post("/v1/chat/completions", json={"messages": msg, **extra}),
                400,
                "prompt_logprobs",
            )


@pytest.mark.parametrize("depth", [100_000, 500], ids=["past-the-recursion-limit", "500-deep"])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_400_for_deeply_nested_json(afd_server, route, depth):
    # 100 000 nested lists (200 kB, on a tokenizer thread) overflow the JSON parser's
    # recursion; 500 (1 kB, on the loop) pass it but not pydantic's depth limit: both a 400
    nested = b"[" * depth + b"]" * depth
    raw = b'{"prompt": ' + nested + b', "messages": ' + nested + b"}"
    with afd_server.http() as h:
        err = _assert_error(h.post(route, content=raw), 400, None)
        assert "nested too deeply" in err["message"] or "recursion" in err["message"]
        assert h.get("/health").status_code == 200


def test_400_prompt_plus_max_tokens_beyond_context(afd_server):
    limit = afd_server.engine.max_model_len
    with afd_server.http() as h:
        err = _assert_error(
            h.post("/v1/completions", json={"prompt": [1] * 10, "max_tokens": limit - 9}),
            400,
            "max_tokens",
        )
        assert str(limit) in err["message"]
        _assert_error(
            h.post("/v1/completions", json={"prompt": [1] * limit, "max_tokens": 1}), 400, "prompt"
        )
        ok = h.post(
            "/v1/completions",
            json={"prompt": [1] * 10, "max_tokens": limit - 10, "stop_token_ids": list(range(384))},
        )
        assert ok.status_code == 200  # exactly the context is fine (ends at once on a stop id)
        msg = [{"role": "user", "content": "y" * 10}]
        _assert_error(
            h.post("/v1/chat/completions", json={"messages": msg, "max_tokens": limit}),
            400,
            "max_tokens",
        )


def test_openai_client_raises_typed_errors(afd_server):
    client = afd_server.openai()
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=SERVED, prompt="x", max_tokens=0)
    assert bad.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "x"}], temperature=3.0
        )
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert "no-such-model" in str(nf.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_404_unknown_route_in_openai_shape(afd_server):
    with afd_server.http() as h:
        _assert_error(h.get("/v1/nothing-here"), 404)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_429_only_beyond_the_batch_slots_with_retry_after_and_admitted_requests_complete():
    # one attention worker, 2 batch slots, room for 3 waiting beyond them; the engine is held
    # so that nothing is scheduled while the burst arrives: 2 + 3 admitted, the rest 429 (the
    # 2 that the next step schedules at once do not count against --max-queue)
    slots, room, n = 2, 3, 10
    with live_server(
        mode="aggregated", attention_workers=1, max_num_seqs=slots, max_queue=room
    ) as srv:
        with srv.held_engine() as gate, ThreadPoolExecutor(n) as pool:

            def send(i: int):
                with srv.http() as h:
                    return h.post(
                        "/v1/completions",
                        json={"prompt": [5 + i, 6, 7], "max_tokens": 8, "ignore_eos": True},
                    )

            futures = [pool.submit(send, i) for i in range(n)]
            deadline = time.monotonic() + 30
            admitted = slots + room
            while sum(f.done() for f in futures) < n - admitted:  # the 429s come back at once
                assert time.monotonic() < deadline, "no 429s while the queue was full"
                time.sleep(0.01)
            assert srv.engine.state(afd=False).num_waiting == admitted  # none scheduled yet
            assert srv.serving.async_engine.queued() == room
            gate.set()
            responses = [f.result() for f in futures]
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] * admitted + [429] * (n - admitted)
        for r in responses:
            if r.status_code == 429:
                err = _assert_error(r, 429, None)
                assert err["type"] == "RateLimitError"
                assert r.headers["retry-after"] == "1"  # queue_limit.RETRY_AFTER_S
            else:
                assert "retry-after" not in r.headers
                assert r.json()["usage"]["completion_tokens"] == 8
        srv.wait_idle()
        with srv.http() as h:
            text = h.get("/metrics").text
        assert _metric(text, "afdserve:request_rejected_total", reason="queue_full") == n - admitted
        client = srv.openai()  # the official client sees a RateLimitError (it does not retry)
        with srv.held_engine():
            threads = [threading.Thread(target=_quiet, args=(client,)) for _ in range(admitted)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while srv.engine.state(afd=False).num_waiting < admitted:
                assert time.monotonic() < deadline, "requests did not queue"
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as exc:
                client.completions.create(model=SERVED, prompt="x", max_tokens=2)
            assert exc.value.response.headers["retry-after"] == "1"
        for t in threads:
            t.join(30)
        srv.wait_idle()


def test_queued_beyond_slots_counts_each_worker_apart():
    def worker(k: int, running: int, waiting: int) -> WorkerState:
        return WorkerState(k, running, waiting, 0.0, 0, 10, 0, {}, 0)

    # worker 0: 4 running, 3 waiting of which 3 are past its 4 slots; worker 1: 1 running and
    # 2 waiting, which its free slots take at its next step; free slots on one worker do not
    # take the other's queue (the router already placed those requests)
    state = EngineState((worker(0, 4, 3), worker(1, 1, 2)))
    assert queued_beyond_slots(state, 4) == 3
    assert queued_beyond_slots(state, 2) == 5 + 1
    assert queued_beyond_slots(state, 100) == 0


def _quiet(client) -> None:
    client.completions.create(model=SERVED, prompt="queued", max_tokens=2)


def test_503_when_a_worker_is_down():
    # the FFN worker hangs: attention workers time out (1 s), the engine step fails, in-flight
    # requests get 503 (in-band for streams), /health and new requests answer 503
    with live_server(mode="afd", attention_workers=2, microbatches=2, sync_timeout_s=1.0) as srv:
        with srv.http() as h:
            assert (
                h.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200
            )

        def hung(wait_s: float) -> bool:
            time.sleep(wait_s)  # alive, but never serves anything
            return False

        srv.engine.ffns[0].serve_once = hung
        with srv.http() as h, ThreadPoolExecutor(2) as pool:
            plain = pool.submit(h.post, "/v1/completions", json={"prompt": "a", "max_tokens": 50})
            client = srv.openai()
            stream = client.completions.create(model=SERVED, prompt="b", max_tokens=50, stream=True)
            with pytest.raises(openai.APIError) as in_band:
                list(stream)
            assert "engine failed" in str(in_band.value)
            err = _assert_error(plain.result(), 503, None)
            assert err["type"] == "ServiceUnavailableError"
            assert "TransportTimeout" in err["message"]
            _assert_error(h.get("/health"), 503)
            _assert_error(h.post("/v1/completions", json={"prompt": "again", "max_tokens": 2}), 503)
            with pytest.raises(openai.InternalServerError) as later:
                client.chat.completions.create(
                    model=SERVED, messages=[{"role": "user", "content": "x"}]
                )
            assert later.value.status_code == 503
            text = h.get("/metrics").text
        assert _metric(text, "afdserve:healthy") == 0.0
        assert _metric(text, "afdserve:afd_sync_timeouts_total") >= 1.0
        assert _metric(text, "vllm:request_success_total", finished_reason="error") == 2.0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_503_as_soon_as_the_ffn_worker_dies():
    # no request needs to time out first: /health sees the dead FFN loop at once
    with live_server(mode="afd", attention_workers=2, microbatches=2) as srv:

        def died(wait_s: float) -> bool:
            raise ConnectionError("FFN worker process died")

        srv.engine.ffns[0].serve_once = died
        with srv.http() as h:
            deadline = time.monotonic() + 10
            while h.get("/health").status_code != 503:
                assert time.monotonic() < deadline, "/health still 200 with the FFN loop dead"
                time.sleep(0.05)
            err = _assert_error(h.get("/health"), 503)
            assert "worker is down" in err["message"]
            _assert_error(h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 503)


# ---- null means the default; fields not implemented yet are a 400 naming them ----------------

COMPLETION_NULLS = [
    "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids", "stream", "stream_options",
    "logprobs", "echo", "suffix", "best_of", "presence_penalty", "frequency_penalty",
    "logit_bias", "user", "ignore_eos", "return_token_ids", "min_p", "min_tokens",
    "repetition_penalty", "response_format", "add_special_tokens", "prompt_logprobs",
]  # fmt: skip
CHAT_NULLS = [
    "temperature", "top_p", "n", "stop", "stream", "stream_options", "logprobs", "top_logprobs",
    "max_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "tools", "tool_choice",
    "response_format", "parallel_tool_calls", "user", "echo", "add_generation_prompt",
    "continue_final_message", "chat_template", "chat_template_kwargs", "documents", "metadata",
]  # fmt: skip


def test_null_means_the_default(afd_server):
    with afd_server.http() as h:
        base = {"prompt": "Hello", "max_tokens": 4, "seed": 3}
        want = h.post("/v1/completions", json=base).json()["choices"]
        r = h.post("/v1/completions", json={**base, **dict.fromkeys(COMPLETION_NULLS)})
        assert r.status_code == 200, r.text
        assert r.json()["choices"] == want  # temperature null is 1.0, seeded: the same tokens
        msgs = [{"role": "user", "content": "hi", "name": None}]
        base = {"messages": msgs, "max_completion_tokens": 3, "seed": 5}
        want = h.post("/v1/chat/completions", json=base).json()["choices"]
        r = h.post("/v1/chat/completions", json={**base, **dict.fromkeys(CHAT_NULLS)})
        assert r.status_code == 200, r.text
        assert r.json()["choices"] == want
        opts = {"stream_options": {"include_usage": None, "continuous_usage_stats": None}}
        r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, **opts})
        assert r.status_code == 200, r.text
        # a field's own None keeps its meaning: completions' max_tokens null is the rest of
        # the context (as vLLM), here cut short by a stop on every token
        stop_all = {"stop_token_ids": list(range(384))}
        r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": None, **stop_all})
        assert r.status_code == 200, r.text
        # strict otherwise: null for a required field, a string for a number
        _assert_error(h.post("/v1/completions", json={"prompt": None}), 400, "prompt")
        _assert_error(h.post("/v1/chat/completions", json={"messages": None}), 400, "messages")
        bad = {"prompt": "x", "temperature": "0.5"}
        _assert_error(h.post("/v1/completions", json=bad), 400, "temperature")
        _assert_error(h.post("/v1/completions", json={"prompt": "x", "n": True}), 400, "n")


NON_NEUTRAL = {
    "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": " ", "use_beam_search": True, "length_penalty": 0.5,
    "include_stop_str_in_output": True, "skip_special_tokens": False,
    "spaces_between_special_tokens": False, "truncate_prompt_tokens": 5,
    "allowed_token_ids": [1, 2], "bad_words": ["x"], "logprob_token_ids": [1],
    "return_tokens_as_token_ids": True, "logits_processors": ["x"], "priority": 1,
    "request_id": "abc", "vllm_xargs": {"a": 1}, "kv_transfer_params": {"a": 1},
    "mm_processor_kwargs": {"a": 1}, "suffix": "x", "prompt_embeds": "abc",
    "functions": [{"name": "f"}], "function_call": "auto", "reasoning_effort": "low",
    "thinking_token_budget": 10, "include_reasoning": False, "modalities": ["text", "audio"],
    "audio": {"voice": "x"}, "prediction": {"type": "content", "content": "x"},
    "web_search_options": {}, "store": True, "service_tier": "flex", "verbosity": "low",
}  # fmt: skip
"""A value that turns each not-yet-supported field on (a sample per NOT_SUPPORTED entry)."""


USER_X = [{"role": "user", "content": "x"}]


def _unsupported_cases() -> list[tuple[str, str]]:
    from afdserve.server.protocol import ChatCompletionRequest, CompletionRequest

    cases = [("/v1/completions", f) for f in CompletionRequest.not_supported()]
    cases += [("/v1/chat/completions", f) for f in ChatCompletionRequest.not_supported()]
    return cases


@pytest.mark.parametrize(("route", "field"), _unsupported_cases(), ids=lambda v: str(v))
def test_400_naming_each_field_not_supported_yet(afd_server, route, field):
    assert field in NON_NEUTRAL, f"add a non-neutral sample value of {field} to NON_NEUTRAL"
    body = (
        {"prompt": "x"} if "chat" not in route else {"messages": [{"role": "user", "content": "x"}]}
    )
    with afd_server.http() as h:
        err = _assert_error(h.post(route, json={**body, field: NON_NEUTRAL[field]}), 400, field)
    assert field in err["message"] and "not supported" in err["message"]


def test_neutral_values_of_fields_not_supported_yet_are_accepted(afd_server):
    from afdserve.server.protocol import ChatCompletionRequest, CompletionRequest

    with afd_server.http() as h:
        for route, schema, body in (
            ("/v1/completions", CompletionRequest, {"prompt": "x"}),
            ("/v1/chat/completions", ChatCompletionRequest, {"messages": USER_X}),
        ):
            table = schema.not_supported()
            for pick in (0, -1):  # the first neutral value of each, then the last
                neutral = {f: values[pick] for f, values in table.items()}
                r = h.post(route, json={**body, **neutral, "max_tokens": 1})
                assert r.status_code == 200, r.text
