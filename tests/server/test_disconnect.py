"""A client that goes away cancels its request: the engine aborts it, its KV blocks are freed
at once, and it stops generating tokens."""

from __future__ import annotations

import time

import httpx

from tests.server.conftest import SERVED


def _generated(srv) -> int:
    return srv.engine.state(afd=False).counter("generation_tokens")


def _aborted(srv) -> float:
    with srv.http() as h:
        text = h.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "vllm:request_success_total" and s.labels["finished_reason"] == "abort":
                return s.value
    return 0.0


def test_disconnect_mid_stream_frees_kv_and_stops_compute(afd_server):
    srv = afd_server
    srv.wait_idle()
    aborted_before = _aborted(srv)
    limit = srv.engine.max_model_len
    body = {
        "model": SERVED,
        "prompt": [65, 32, 108, 111],
        "max_tokens": limit - 8,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(base_url=srv.base_url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    got += 1
                if got == 5:
                    break
            st = srv.engine.state(afd=False)
            assert st.num_running == 1 and st.kv_usage > 0.0  # it is running, holding KV
        # leaving the block closes the half-read response: the connection goes away
    st = srv.wait_idle(deadline_s=20)
    assert st.kv_usage == 0.0
    generated = _generated(srv)
    time.sleep(0.3)
    assert _generated(srv) == generated  # nothing runs any more
    assert generated < limit  # it never ran to its max_tokens
    assert _aborted(srv) == aborted_before + 1


def test_disconnect_while_waiting_for_a_non_streamed_answer(afd_server):
    srv = afd_server
    srv.wait_idle()
    limit = srv.engine.max_model_len
    body = {
        "model": SERVED,
        "prompt": [66, 32, 108, 111],
        "max_tokens": limit - 8,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=srv.base_url, timeout=httpx.Timeout(30, read=0.5)) as client:
        try:
            resp = client.post("/v1/completions", json=body)
            raise AssertionError(f"the request should not finish in 0.5 s: {resp.text[:200]}")
        except httpx.ReadTimeout:
            pass  # the client gives up and closes the connection
    st = srv.wait_idle(deadline_s=20)
    assert st.kv_usage == 0.0
