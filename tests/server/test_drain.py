"""Shutdown by signal (server/drain.py): the first SIGTERM or Ctrl-C drains (new requests and
/health get 503, requests in flight finish), the --shutdown-timeout cuts what is left with a
503 (streams: an error event, then [DONE]), a second signal cuts at once; `afdserve serve` as
a subprocess finishes a stream it was serving when SIGTERM came.

In-process servers get the signal as uvicorn's handler would (`server.handle_exit`, called
from the test thread: a server thread installs no signal handlers). The engine is held
between steps where a test needs a request to stay in flight, so no outcome depends on time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from afdserve.server.state import FrontOptions
from tests.server.conftest import SERVED, LiveServer, live_server, wait_until_healthy
from tests.server.test_errors import _assert_error

DEADLINE_S = 30.0


@contextmanager
def steps_then_hold(srv: LiveServer, steps: int) -> Iterator[threading.Event]:
    """Let the engine run `steps` steps, then hold it before the next until the yielded event
    is set (or the block ends)."""
    engine = srv.engine
    gate = threading.Event()
    original = engine.step
    ran = [0]

    def step():
        if ran[0] >= steps and not gate.wait(timeout=DEADLINE_S):
            raise AssertionError(f"engine held for {DEADLINE_S}s: test forgot to release it")
        ran[0] += 1
        return original()

    engine.step = step
    try:
        yield gate
    finally:
        gate.set()
        engine.step = original


def _wait(cond, what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not cond():
        assert time.monotonic() < end, f"{what} not within {DEADLINE_S}s"
        time.sleep(0.01)


def _events(lines: Iterator[str]) -> list[str]:
    """The `data:` payloads of an SSE stream, [DONE] included."""
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def _serving(srv: LiveServer) -> bool:
    return not srv.server.should_exit


STREAM = {
    "model": SERVED,
    "prompt": [5, 6, 7],
    "max_tokens": 24,
    "ignore_eos": True,
    "return_token_ids": True,
}


def test_drain_refuses_new_requests_and_lets_streams_finish():
    front = FrontOptions(shutdown_timeout_s=120)
    with live_server(mode="aggregated", attention_workers=1, front=front) as srv:
        ae = srv.serving.async_engine
        with steps_then_hold(srv, 3) as gate, srv.http() as h, srv.http() as other:
            with h.stream("POST", "/v1/completions", json={**STREAM, "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert json.loads(first[6:])["choices"][0]["text"] is not None
                srv.server.handle_exit(signal.SIGTERM, None)  # what SIGTERM runs
                _wait(lambda: ae.draining, "the drain")
                # still listening, but refusing: 503 for a new request, /health 503
                err = _assert_error(other.post("/v1/completions", json=STREAM), 503, None)
                assert "shutting down" in err["message"]
                health = other.get("/health")
                assert health.status_code == 503 and "shutting down" in health.text
                assert _serving(srv)  # the stream is held in flight: no exit yet
                gate.set()
                rest = _events(lines)
        assert rest[-1] == "[DONE]"
        chunks = [json.loads(first[6:])] + [json.loads(e) for e in rest[:-1]]
        assert "error" not in json.dumps(chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == STREAM["max_tokens"]
        _wait(lambda: srv.server.should_exit, "the exit after the drain")
        assert srv.server.cut == 0


def test_shutdown_timeout_cuts_a_stream_with_an_error_event_and_done():
    front = FrontOptions(shutdown_timeout_s=0.2)  # held below: these requests cannot finish
    with live_server(mode="aggregated", attention_workers=1, front=front) as srv:
        with (
            steps_then_hold(srv, 2) as gate,
            srv.http() as h,
            srv.http() as h2,
            ThreadPoolExecutor(1) as pool,
        ):
            with h.stream("POST", "/v1/completions", json={**STREAM, "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                collected = pool.submit(h2.post, "/v1/completions", json=STREAM)  # held
                _wait(lambda: srv.serving.async_engine.num_in_flight == 2, "both requests")
                srv.server.handle_exit(signal.SIGTERM, None)
                rest = _events(lines)  # ends once the timeout cut it
            resp = collected.result(timeout=DEADLINE_S)
            gate.set()
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert rest[-1] == "[DONE]"
        err = json.loads(rest[-2])["error"]
        assert err["code"] == 503 and err["type"] == "ServiceUnavailableError"
        assert "shutdown timeout (0.2s)" in err["message"]
        assert all("error" not in json.loads(e) for e in rest[:-2])
        # the non-streamed request: a 503 body saying why, in OpenAI's shape
        err = _assert_error(resp, 503, None)
        assert "did not finish within the shutdown timeout" in err["message"]
        _wait(lambda: srv.server.should_exit, "the exit after the drain")
        assert srv.server.cut == 2


def test_a_second_signal_cuts_at_once():
    front = FrontOptions(shutdown_timeout_s=3600)  # only the second signal can end this drain
    with live_server(mode="aggregated", attention_workers=1, front=front) as srv:
        with steps_then_hold(srv, 1) as gate, srv.http() as h:
            with h.stream("POST", "/v1/completions", json={**STREAM, "stream": True}) as r:
                lines = r.iter_lines()
                srv.server.handle_exit(signal.SIGINT, None)
                _wait(lambda: srv.serving.async_engine.draining, "the drain")
                assert _serving(srv)
                srv.server.handle_exit(signal.SIGINT, None)
                rest = _events(lines)
            gate.set()
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == 503
        _wait(lambda: srv.server.should_exit, "the exit after the cut")
        assert srv.server.cut == 1


def test_serve_subprocess_finishes_a_stream_across_sigterm():
    from afdserve.transport.options import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "afdserve.cli", "serve", "builtin:tiny-llama"]
    cmd += ["--mode", "aggregated", "--attention-workers", "1", "--threads", "1"]
    cmd += ["--port", str(port), "--served-model-name", "m", "--shutdown-timeout", "120"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    max_tokens = 2000  # seconds of decoding on any CPU: SIGTERM lands mid-stream
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, proc, 90, proc.stdout.read)
        body = {"model": "m", "prompt": [5, 6], "max_tokens": max_tokens, "ignore_eos": True}
        body |= {"stream": True, "return_token_ids": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            # draining, still listening: /health turns 503 and a new request is refused
            with httpx.Client(base_url=url, timeout=30) as other:
                end = time.monotonic() + DEADLINE_S
                while other.get("/health").status_code != 503:
                    assert time.monotonic() < end, "/health still 200 after SIGTERM"
                    time.sleep(0.01)
                short = {"model": "m", "prompt": [5], "max_tokens": 2}
                _assert_error(other.post("/v1/completions", json=short), 503, None)
            rest = _events(lines)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert rest[-1] == "[DONE]", out
    chunks = [json.loads(first[6:])] + [json.loads(e) for e in rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length", out
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == max_tokens
    assert "draining: 1 request(s) in flight" in out and "drain done (0 cut)" in out
    assert "engine stopped" in out and "Application shutdown complete" in out
    assert proc.returncode in (0, -signal.SIGTERM), out


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_shutdown_timeout_must_be_a_finite_non_negative_number(value, capsys):
    from afdserve.cli import main

    assert main(["serve", "builtin:tiny-llama", "--shutdown-timeout", value]) == 2
    assert "--shutdown-timeout" in capsys.readouterr().err
