"""Live servers for the API tests: a real uvicorn server on 127.0.0.1 (free port), in a thread.

The server runs in this process so that tests can look at the engine (KV usage, queues) and
inject faults (hold the engine thread, make a worker fail). Every server is shut down in a
`finally`, whatever the test did.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

MODEL = "builtin:tiny-qwen3-moe"
SERVED = "tiny"
START_DEADLINE_S = 60.0


@dataclass
class LiveServer:
    base_url: str
    app: Any
    server: Any

    @property
    def serving(self) -> Any:
        return self.app.state.serving

    @property
    def engine(self) -> Any:
        return self.serving.async_engine.engine

    def openai(self) -> Any:
        import openai

        return openai.OpenAI(
            base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=60
        )

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kw.pop("timeout", 60), **kw)

    def wait_idle(self, deadline_s: float = 20.0) -> Any:
        """Wait until no request runs or waits and no KV block is held; returns the state."""
        end = time.monotonic() + deadline_s
        while True:
            st = self.engine.state(afd=False)
            if st.num_running == 0 and st.num_waiting == 0 and st.kv_usage == 0.0:
                return st
            if time.monotonic() > end:
                raise AssertionError(f"engine not idle after {deadline_s}s: {st}")
            time.sleep(0.02)

    @contextmanager
    def held_engine(self) -> Iterator[threading.Event]:
        """Hold the engine thread before its next step until the yielded event is set (or the
        block ends), so that queued requests stay queued: deterministic admission tests."""
        engine = self.engine
        gate = threading.Event()
        original = engine.step

        def gated_step() -> Any:
            if not gate.wait(timeout=30):
                raise AssertionError("engine held for 30s: test forgot to release it")
            return original()

        engine.step = gated_step
        try:
            yield gate
        finally:
            gate.set()
            engine.step = original


@contextmanager
def live_server(
    model: str = MODEL, max_queue: int = 1024, front: Any = None, **options: Any
) -> Iterator[LiveServer]:
    """A server over an engine of EngineConfig(**options); `front`: its FrontOptions."""
    import uvicorn

    from afdserve.config import EngineConfig
    from afdserve.launch.start import start_engine
    from afdserve.model.config import ModelConfig
    from afdserve.model.tokenizer import load_tokenizer
    from afdserve.server.api import build_app
    from afdserve.server.drain import DrainingServer
    from afdserve.server.state import FrontOptions

    cfg = EngineConfig(model=model, **options)
    engine, path = start_engine(cfg)  # in-process, or worker processes (transport != local)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    thread = None
    server = None
    try:
        app = build_app(  # as `afdserve serve` builds it (server/cli.py)
            engine,
            load_tokenizer(path, engine.vocab_size, cfg.skip_tokenizer_init),
            cfg,
            served_model_name=SERVED,
            model_root=str(path),
            max_queue=max_queue,
            sampling_defaults=ModelConfig.from_dir(path).sampling_defaults,
            options=front,
        )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = DrainingServer(  # as `afdserve serve` runs it: server.handle_exit drains
            uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5),
            app.state.serving.async_engine,
            (front or FrontOptions()).shutdown_timeout_s,
        )
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        end = time.monotonic() + START_DEADLINE_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        yield LiveServer(f"http://127.0.0.1:{port}", app, server)
    finally:
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=30)
            assert not thread.is_alive(), "test server did not shut down"
        sock.close()
        engine.close()


@pytest.fixture(scope="module")
def afd_server() -> Iterator[LiveServer]:
    """AFD 2A1F, 2 microbatches: the default `afdserve serve` shape."""
    with live_server(mode="afd", attention_workers=2, microbatches=2) as s:
        yield s


@pytest.fixture(scope="module")
def oracle() -> Iterator[Callable[..., Any]]:
    """oracle(prompt, **SamplingParams fields) -> the offline LLM's RequestOutput, one prompt
    at a time on an engine shaped like the server's."""
    from afdserve.llm import LLM
    from afdserve.types import SamplingParams

    llm = LLM(MODEL, mode="afd", attention_workers=2, microbatches=2)
    try:
        yield lambda prompt, **kw: llm.generate([prompt], SamplingParams(**kw))[0]
    finally:
        llm.close()


def wait_until_healthy(url: str, proc: Any, timeout_s: float, output: Callable[[], str]) -> None:
    """Poll `url`/health until it answers 200; fails (with `output()`, the server's log) if
    `proc` exits first or `timeout_s` passes."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, output()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not come up: " + output()
        time.sleep(0.2)
