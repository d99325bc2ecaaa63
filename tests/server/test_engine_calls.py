"""The engine's blocking calls run off the event loop (server/engine_calls.py): an abort or an
add that blocks (a worker process that stopped reading its control socket) holds neither
/health nor the other streams; an add that cannot get its turn within the admission deadline
is a 503; an add whose caller went away is undone.

The engine's `add_request` / `abort` are replaced by versions that block until the test
releases them, which is what a front of worker processes does for up to 1 s per add and
0.2 s per abort. A call that blocked the loop would make the other requests here time out.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from afdserve.server.engine_calls import EngineCalls
from tests.server.conftest import SERVED, LiveServer, live_server
from tests.server.test_errors import _assert_error

DEADLINE_S = 30.0
HELD = [9, 9, 9]  # the prompt whose add blocks


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(mode="aggregated", attention_workers=1) as s:
        yield s


def _block(srv: LiveServer, name: str, when) -> tuple[threading.Event, threading.Event]:
    """Make engine.`name` block while `when(*args)` until released; (entered, release)."""
    engine = srv.engine
    real = getattr(engine, name)
    entered, release = threading.Event(), threading.Event()

    def blocking(*args, **kwargs):
        if when(*args):
            entered.set()
            assert release.wait(DEADLINE_S), "the test never released the engine call"
        return real(*args, **kwargs)

    setattr(engine, name, blocking)  # an instance attribute shadows the method
    return entered, release


def _unblock(srv: LiveServer, name: str) -> None:
    delattr(srv.engine, name)


def _stream_body(prompt: list[int], max_tokens: int = 16) -> dict:
    return {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}


def test_a_blocked_abort_holds_neither_health_nor_other_requests(server):
    first_abort = threading.Event()

    def first(*_):  # only the first abort blocks
        if first_abort.is_set():
            return False
        first_abort.set()
        return True

    entered, release = _block(server, "abort", first)
    try:
        with server.http() as h:
            with h.stream(
                "POST", "/v1/completions", json={**_stream_body([5, 6], 500), "stream": True}
            ) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))
            # the client went away: its abort is under way, and blocked
            assert entered.wait(DEADLINE_S), "the disconnect never aborted the request"
            with server.http(timeout=15) as other:
                assert other.get("/health").status_code == 200
                resp = other.post("/v1/completions", json=_stream_body([7, 8], 4))
                assert resp.status_code == 200, resp.text
                assert resp.json()["usage"]["completion_tokens"] == 4
    finally:
        release.set()
        _unblock(server, "abort")
    server.wait_idle()  # the abort went through once released: its KV blocks are free


def test_a_blocked_add_holds_only_admissions_and_they_have_a_deadline(server):
    ae = server.serving.async_engine
    entered, release = _block(server, "add_request", lambda rid, ids, *a: list(ids) == HELD)
    ae.admit_timeout_s = 0.5  # a short admission deadline; the held add itself is unbounded
    try:
        with server.http() as h, server.http() as h2, ThreadPoolExecutor(1) as pool:
            with h.stream(
                "POST", "/v1/completions", json={**_stream_body([5, 6], 24), "stream": True}
            ) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                held = pool.submit(h2.post, "/v1/completions", json=_stream_body(HELD, 3))
                assert entered.wait(DEADLINE_S), "the held add never started"
                # the add holds the admission lock: the loop still serves /health and streams
                with server.http(timeout=15) as other:
                    assert other.get("/health").status_code == 200
                    # a new request waits for its turn, up to the admission deadline: 503
                    err = _assert_error(
                        other.post("/v1/completions", json=_stream_body([1, 2], 2)), 503, None
                    )
                    assert "did not take the request within 0.5s" in err["message"]
                rest = [line[6:] for line in lines if line.startswith("data: ")]
            release.set()
            resp = held.result(timeout=DEADLINE_S)
    finally:
        release.set()
        ae.admit_timeout_s = 30.0
        _unblock(server, "add_request")
    chunks = [json.loads(first[6:])] + [json.loads(e) for e in rest[:-1]]
    assert rest[-1] == "[DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it streamed to its end
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
    server.wait_idle()


def test_an_add_whose_caller_was_cancelled_is_undone():
    calls = EngineCalls(threads=1)
    started, release = threading.Event(), threading.Event()
    undone: list[int] = []

    def add() -> int:
        started.set()
        assert release.wait(DEADLINE_S)
        return 7  # what the engine's add returns: the worker it went to

    async def main() -> None:
        task = asyncio.ensure_future(calls.run(add, on_orphan=undone.append))
        await asyncio.to_thread(started.wait, DEADLINE_S)
        task.cancel()  # the request's handler went away while its add was running
        with pytest.raises(asyncio.CancelledError):
            await task
        assert undone == []  # the add has not finished yet
        release.set()

    try:
        asyncio.run(main())
        calls.close()
        calls._pool.shutdown(wait=True)  # the add and its clean-up ran to their end
    finally:
        release.set()
    assert undone == [7]


def test_a_call_cancelled_before_it_started_is_not_undone():
    calls = EngineCalls(threads=1)
    release = threading.Event()
    undone: list[object] = []

    async def main() -> None:
        blocker = asyncio.ensure_future(calls.run(release.wait, DEADLINE_S))
        queued = asyncio.ensure_future(calls.run(lambda: "added", on_orphan=undone.append))
        await asyncio.sleep(0)
        queued.cancel()  # still queued behind the blocker: it never runs
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        assert await blocker is True

    try:
        asyncio.run(main())
        calls.close()
        calls._pool.shutdown(wait=True)
    finally:
        release.set()
    assert undone == []
