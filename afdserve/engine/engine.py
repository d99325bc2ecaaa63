"""The step loop of one bundle: r attention workers (and, in AFD, the FFN worker they share).

One call to `step()` is one bundle step: every attention worker's scheduler plans, all workers
execute together (in AFD each on its own thread, with the FFN worker on another, exchanging
hidden states through the transport), then every scheduler takes its results. Requests enter
through `add_request`, routed to the least-loaded attention worker.

Thread safety: `add_request`/`abort` may be called from another thread while `step()` runs;
scheduler state is only touched under `self._lock`, never during model execution.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from afdserve.afd.attention_worker import AttentionWorker
from afdserve.afd.ffn_worker import FFNWorker
from afdserve.afd.router import Router
from afdserve.errors import UserInputError
from afdserve.types import Request, SamplingParams, StepPlan, StepResult, TokenEvent


class Engine:
    def __init__(self, workers: Sequence[AttentionWorker], ffn: FFNWorker | None = None, seed: int = 0,
                 on_close: Sequence = (), vocab_size: int | None = None) -> None:
        self.workers = list(workers)
        self.vocab_size = vocab_size
        self.ffn = ffn
        self.router = Router(self.workers)
        self._pool = ThreadPoolExecutor(len(self.workers) + 1, thread_name_prefix="afd") if ffn else None
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._owner: dict[str, int] = {}
        self._step = 0
        self._on_close = list(on_close)
        self.step_times: list[float] = []

    @property
    def max_model_len(self) -> int:
        return self.workers[0].scheduler.max_model_len

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                    arrival_time: float | None = None) -> int:
        """Queue a request on the least-loaded attention worker; returns the worker's index."""
        if self.vocab_size is not None:
            bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise UserInputError(
                    f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
                )
        with self._lock:
            if request_id in self._owner:
                raise UserInputError(f"duplicate request id {request_id!r}")
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            request = Request(request_id, tuple(prompt_token_ids), params,
                              time.monotonic() if arrival_time is None else arrival_time, seed)
            k = self.router.choose()
            self.workers[k].scheduler.add_request(request)
            self._owner[request_id] = k
            return k

    def abort(self, request_id: str) -> bool:
        with self._lock:
            k = self._owner.pop(request_id, None)
            return k is not None and self.workers[k].scheduler.abort_request(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return any(w.scheduler.has_unfinished() for w in self.workers)

    def step(self) -> list[TokenEvent]:
        """Run one bundle step; returns the token events of every worker (empty if idle)."""
        with self._lock:
            plans = [w.scheduler.schedule() for w in self.workers]
        if all(p.is_empty for p in plans):
            return []
        step, t0 = self._step, time.perf_counter()
        self._step += 1
        results = self._execute(plans, step)
        self.step_times.append(time.perf_counter() - t0)
        events: list[TokenEvent] = []
        with self._lock:
            for w, plan, result in zip(self.workers, plans, results, strict=True):
                if not plan.is_empty:
                    events.extend(w.scheduler.update(plan, result))
            for e in events:
                if e.finished:
                    self._owner.pop(e.request_id, None)
        return events

    def _execute(self, plans: list[StepPlan], step: int) -> list[StepResult]:
        if self._pool is None:
            return [w.execute(p, step) for w, p in zip(self.workers, plans, strict=True)]
        ffn_future = self._pool.submit(self.ffn.serve_step, step)
        futures = [self._pool.submit(w.execute, p, step) for w, p in zip(self.workers, plans, strict=True)]
        results = [f.result() for f in futures]  # re-raises a worker's error (e.g. a timeout)
        ffn_future.result()
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for fn in self._on_close:
            fn()
        self._on_close.clear()
