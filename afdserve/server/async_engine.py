"""AsyncEngine: the blocking engine, stepped on one background thread, seen from asyncio.

The engine's `step()` blocks for a whole bundle step (every attention worker and the FFN), so
it runs on a thread of its own that steps while there is work and sleeps otherwise. After each
step the thread hands that step's token events to the event loop in one
`loop.call_soon_threadsafe` call, which puts each event on its request's asyncio queue. A
request's consumer (`RequestHandle`) detokenizes, applies stop strings (on text, so here and not
in the scheduler), and yields `GenerationOutput` deltas; the HTTP layer turns those into JSON or
server-sent events.

Failure is never silent: if `step()` raises, the thread records the error, every in-flight
request fails with a 503, new requests get 503, and `healthy` turns false (/health answers
503). Admission is bounded: when `max_queue` requests already wait beyond the batch slots
(server/queue_limit.py), a new one is refused (429, with Retry-After) instead of growing memory
without limit. A request whose consumer goes away (client disconnect, stop string) is aborted in
the engine, which frees its KV blocks at once.

The event loop never waits for the engine: adds, aborts and state reads run on `EngineCalls`
threads (a front of worker processes blocks on control sockets there). Admissions are
serialised by one lock, so the queue check and the add it allows happen together and a burst
is counted exactly; each waits for that lock at most `ADMIT_TIMEOUT_S` (then 503).

Draining (`drain`, on SIGTERM): new requests get 503 and /health 503, the engine keeps stepping
until every request in flight has finished or the drain's deadline passes, then the rest are
cut: their streams end with an error event and [DONE], their non-streamed answers are a 503.

The engine is an `EngineClient` (afdserve/launch/client.py): the in-process `Engine`, or
`MultiProcessEngine` for `--transport shm|torch|tcp|nixl`, served the same way.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from afdserve.launch.client import EngineClient
from afdserve.model.text_stream import TextStream
from afdserve.model.threads import ThreadCount
from afdserve.model.tokenizer import Tokenizer, with_tokenizer_eos
from afdserve.server.engine_calls import EngineCalls
from afdserve.server.errors import APIError, EngineDead, QueueFull
from afdserve.server.metrics import FinishedRequest
from afdserve.server.queue_limit import RETRY_AFTER_S, queued_beyond_slots
from afdserve.types import PromptLogprob, SamplingParams, TokenEvent

log = logging.getLogger("afdserve.server")

ADMIT_TIMEOUT_S = 30.0
"""Longest a request waits for its turn to be added to the engine (behind other adds, each
bounded by the engine: 1 s to a worker process that does not read); then it is a 503."""
CUT_GRACE_S = 5.0
"""After a drain cuts its requests, how long it waits for their error answers to go out."""


class RequestObserver(Protocol):
    """Per-request metrics hooks (ServerMetrics implements them); called on the event loop."""

    def on_first_token(self, ttft_s: float) -> None: ...

    def on_token(self, itl_s: float) -> None: ...

    def on_finished(self, req: FinishedRequest) -> None: ...

    def on_rejected(self, reason: str) -> None: ...


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationOutput:
    """What one request produced since its previous output (a delta), and whether it is done."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    """Tokens generated so far, this delta's included."""
    prompt_logprobs: tuple[PromptLogprob, ...] | None = None
    """On the first output of a request that asked for prompt logprobs (positions 1..P-1)."""


_ABORT = object()  # queue sentinel: the consumer should stop (client gone)


async def _nothing() -> AsyncIterator[GenerationOutput]:
    return
    yield  # an async generator that yields nothing


@dataclass(eq=False)
class _Stream:
    request_id: str
    num_prompt_tokens: int
    params: SamplingParams
    text: TextStream
    arrival: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class RequestHandle:
    """One admitted request: iterate it for `GenerationOutput`s; `abort()` cancels it.

    Leaving the iteration early (break, exception, task cancellation) aborts the request in the
    engine, so its KV blocks are freed and it stops costing compute.
    """

    def __init__(self, engine: AsyncEngine, stream: _Stream) -> None:
        self._engine = engine
        self._stream = stream
        self._iter: AsyncIterator[GenerationOutput] | None = None

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    def abort(self) -> None:
        """Stop this request (safe to call at any time, any number of times; never blocks)."""
        if self._iter is None:  # never iterated: no iterator will run the cleanup, so do it here
            self._iter = _nothing()
            self._engine._discard(self._stream)
        else:
            self._engine._abort_stream(self._stream)

    def __aiter__(self) -> AsyncIterator[GenerationOutput]:
        if self._iter is None:
            self._iter = self._engine._iterate(self._stream)
        return self._iter


class AsyncEngine:
    def __init__(
        self,
        engine: EngineClient,
        tokenizer: Tokenizer,
        max_queue: int = 1024,
        *,
        max_num_seqs: int,
        observer: RequestObserver | None = None,
        step_timeout_s: float = 60.0,
        sampling_defaults: Mapping[str, Any] | None = None,
    ) -> None:
        """`step_timeout_s` bounds how long shutdown waits for a step in progress (a step's
        own waits are bounded by the engine's sync timeout; give at least that).
        `sampling_defaults` (the model's generation_config.json, ModelConfig.sampling_defaults)
        are what requests that leave temperature, top_p or top_k out sample with.
        `max_num_seqs`: each attention worker's batch slots (EngineConfig.max_num_seqs);
        `max_queue` counts only the requests beyond them."""
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.sampling_defaults: Mapping[str, Any] = dict(sampling_defaults or {})
        self.max_queue = max_queue
        self.max_num_seqs = max_num_seqs
        self.observer = observer
        self.step_timeout_s = step_timeout_s
        self.calls = EngineCalls()
        """Where every blocking engine call runs (never on the event loop)."""
        self._admit_lock = threading.Lock()
        self.admit_timeout_s = ADMIT_TIMEOUT_S
        """Longest a request waits for its turn to be added (then 503)."""
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self.draining = False
        """True from the start of a drain: new requests get 503, /health 503."""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        """Why the engine thread stopped, once it failed."""

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ThreadCount.capture(),), name="afdserve-engine", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        """Stop stepping, fail what is still in flight (503), close the engine."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.step_timeout_s)
            if self._thread.is_alive():
                log.error(
                    "engine thread still in a step after %.0fs; leaving it", self.step_timeout_s
                )
                return
        self._fail_all("the server is shutting down")
        self.calls.close()
        await asyncio.to_thread(self.engine.close)  # worker processes: bounded by their close
        log.info("engine stopped")

    async def drain(self, timeout_s: float, cut_now: asyncio.Event | None = None) -> int:
        """Stop admitting (503), let the requests in flight finish for up to `timeout_s`
        seconds (or until `cut_now` is set), then cut the rest: each gets a 503 error, in-band
        for streams. Returns how many were cut. The engine keeps stepping throughout; `stop`
        closes it afterwards."""
        self.draining = True
        cut_now = cut_now or asyncio.Event()
        n = len(self._streams)
        log.info("draining: %d request(s) in flight, up to %.0fs", n, timeout_s)
        deadline = time.monotonic() + timeout_s
        while self._streams and not cut_now.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:  # woken early by a second signal; else look again every 50 ms
                await asyncio.wait_for(cut_now.wait(), min(0.05, left))
            except TimeoutError:
                pass
        cut = len(self._streams)
        if cut:
            log.warning("drain: cutting %d request(s) still in flight", cut)
            self._fail_all(
                f"the server is shutting down: the request did not finish within the "
                f"shutdown timeout ({timeout_s:g}s)"
            )
            end = time.monotonic() + CUT_GRACE_S
            while self._streams and time.monotonic() < end:  # their answers go out
                await asyncio.sleep(0.01)
        log.info("drain done (%d cut)", cut)
        return cut

    @property
    def healthy(self) -> bool:
        if self.error is not None or self._stopping or self.draining:
            return False
        if self._thread is not None and not self._thread.is_alive():
            return False
        return self.engine.healthy()

    @property
    def problems(self) -> list[str]:
        """What is wrong while the engine still serves (a worker lost or stalled)."""
        return self.engine.problems()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- requests ----------------------------------------------------------------------------

    def check_available(self) -> None:
        """Raise EngineDead (503) when nothing can be served."""
        if self._stopping or self.draining:
            raise EngineDead("the server is shutting down")
        if self.error is not None:
            raise EngineDead(f"the engine failed and cannot serve: {self.error}")
        if not self.healthy:
            raise EngineDead("a worker is down")

    async def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> RequestHandle:
        """Admit one request (raising 400/429/503 errors before anything streams)."""
        (handle,) = await self.add_requests([(request_id, prompt_token_ids, params)])
        return handle

    async def add_requests(
        self, requests: Sequence[tuple[str, Sequence[int], SamplingParams]]
    ) -> list[RequestHandle]:
        """Admit the engine requests of one HTTP request (its prompts times `n`), all or
        nothing, in one EngineCalls call: they reach the engine together, as one batch."""
        self.check_available()
        streams = []
        for request_id, prompt_token_ids, params in requests:
            if request_id in self._streams or any(s.request_id == request_id for s in streams):
                raise ValueError(f"duplicate request id {request_id!r}")
            streams.append(
                _Stream(
                    request_id,
                    len(prompt_token_ids),
                    params,
                    TextStream(self.tokenizer, params.stop, params.min_tokens),  # no tokenizer: 400
                    arrival=time.monotonic(),
                )
            )
        adds = [
            (rid, list(ids), with_tokenizer_eos(params, self.tokenizer), s.arrival)
            for (rid, ids, params), s in zip(requests, streams, strict=True)
        ]
        for s in streams:  # before the adds: their first events find them
            self._streams[s.request_id] = s
        deadline = time.monotonic() + self.admit_timeout_s
        try:
            await self.calls.run(self._admit_all, adds, deadline, on_orphan=self._abort_all)
        except BaseException as exc:
            for s in streams:
                if self._streams.get(s.request_id) is s:
                    del self._streams[s.request_id]
            if isinstance(exc, QueueFull) and self.observer is not None:
                self.observer.on_rejected("queue_full")
            raise
        self._wake.set()
        return [RequestHandle(self, s) for s in streams]

    def queued(self) -> int:
        """Requests that count against `max_queue` now (blocking: an engine state read)."""
        return queued_beyond_slots(self.engine.state(afd=False), self.max_num_seqs)

    def _admit_all(
        self, adds: list[tuple[str, list[int], SamplingParams, float]], deadline: float
    ) -> list[str]:
        """Check the queue and add, request by request, under the admission lock (on an
        EngineCalls thread), so that each check sees every add before it; all or nothing.
        Returns the ids added."""
        if not self._admit_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise EngineDead(
                f"the engine did not take the request within {self.admit_timeout_s:g}s; retry later"
            )
        added: list[str] = []
        try:
            self.check_available()  # it may have failed, or begun draining, meanwhile
            for request_id, prompt_token_ids, params, arrival in adds:
                if self.queued() >= self.max_queue:
                    raise QueueFull(
                        f"the waiting queue is full ({self.max_queue} requests beyond the "
                        f"{self.max_num_seqs} batch slots of each attention worker); retry "
                        "later",
                        retry_after_s=RETRY_AFTER_S,
                    )
                self.engine.add_request(request_id, prompt_token_ids, params, arrival)
                added.append(request_id)
            return added
        except BaseException:
            self._abort_all(added)
            raise
        finally:
            self._admit_lock.release()

    def _abort_all(self, request_ids: list[str]) -> None:
        """Abort engine requests (blocking: on an EngineCalls thread)."""
        for request_id in request_ids:
            self.engine.abort(request_id)

    def _abort_stream(self, stream: _Stream) -> None:
        if self._streams.get(stream.request_id) is stream:
            stream.queue.put_nowait(_ABORT)

    def _discard(self, stream: _Stream) -> None:
        if self._streams.pop(stream.request_id, None) is stream:
            self.calls.fire(self.engine.abort, stream.request_id)
            if self.observer is not None:
                e2e = time.monotonic() - stream.arrival
                self.observer.on_finished(
                    FinishedRequest(
                        "abort", e2e, stream.num_prompt_tokens, 0, stream.params.max_tokens
                    )
                )

    async def _iterate(self, s: _Stream) -> AsyncIterator[GenerationOutput]:
        reason: str | None = None
        n_out = 0
        last_t = s.arrival
        first_t: float | None = None
        first: TokenEvent | None = None  # carries the scheduler's queue and prefill times
        engine_done = False
        try:
            while reason is None:
                items = [await s.queue.get()]
                while not s.queue.empty():
                    items.append(s.queue.get_nowait())
                ids: list[int] = []
                lps: list[TokenLogprob] | None = [] if s.params.logprobs is not None else None
                prompt_lps: tuple[PromptLogprob, ...] | None = None
                for item in items:
                    if item is _ABORT:
                        return
                    if isinstance(item, APIError):
                        reason = "error"
                        raise item
                    t, ev = item
                    if first_t is None:
                        first_t, first = t, ev
                        if self.observer is not None:
                            self.observer.on_first_token(t - s.arrival)
                    elif self.observer is not None:
                        self.observer.on_token(t - last_t)
                    last_t = t
                    n_out += 1
                    ids.append(ev.token_id)
                    if lps is not None and ev.logprob is not None:
                        lps.append(TokenLogprob(ev.token_id, ev.logprob, ev.top_logprobs))
                    if ev.prompt_logprobs is not None:
                        prompt_lps = ev.prompt_logprobs
                    s.text.push(ev.token_id)
                    if ev.finished:
                        engine_done = True
                        reason = ev.finish_reason.value if ev.finish_reason else "stop"
                    elif s.text.stopped:
                        reason = "stop"
                    if reason is not None:
                        break
                if reason is not None:
                    s.text.finish()
                yield GenerationOutput(
                    s.request_id,
                    s.text.take(final=reason is not None),
                    ids,
                    lps,
                    reason is not None,
                    reason,
                    s.num_prompt_tokens,
                    n_out,
                    prompt_lps,
                )
        finally:
            self._streams.pop(s.request_id, None)
            if not engine_done:  # frees its KV blocks now (on an EngineCalls thread)
                self.calls.fire(self.engine.abort, s.request_id)
            if self.observer is not None:
                end = last_t if reason not in (None, "error") else time.monotonic()
                self.observer.on_finished(
                    FinishedRequest(
                        reason or "abort",
                        end - s.arrival,
                        s.num_prompt_tokens,
                        n_out,
                        s.params.max_tokens,
                        queue_s=first.queue_s if first is not None else None,
                        prefill_s=first.prefill_s if first is not None else None,
                        decode_s=last_t - first_t if first_t is not None else None,
                    )
                )

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self, threads: ThreadCount) -> None:
        threads.apply()  # an in-process engine computes on this thread (model/threads.py)
        try:
            while not self._stopping:
                self._wake.clear()
                if not self.engine.has_unfinished():
                    self._wake.wait(0.5)
                    self.engine.poll_idle()
                    continue
                t0 = time.perf_counter()
                events = self.engine.step()
                if events:
                    self._post(self._deliver, events, time.monotonic())
                elif time.perf_counter() - t0 < 1e-4:
                    self._wake.wait(1e-3)  # nothing ran although work is queued: do not spin
        except BaseException as exc:  # noqa: BLE001 - any failure must reach the clients
            log.exception("engine step failed; the server now answers 503")
            self.error = exc
            self._post(self._fail_all, f"the engine failed: {type(exc).__name__}: {exc}")

    def _post(self, fn, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _deliver(self, events: list[TokenEvent], t: float) -> None:
        for ev in events:
            s = self._streams.get(ev.request_id)
            if s is not None:
                s.queue.put_nowait((t, ev))

    def _fail_all(self, message: str) -> None:
        for s in list(self._streams.values()):
            s.queue.put_nowait(EngineDead(message))
