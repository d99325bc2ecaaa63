"""The step loop of one bundle: r attention workers (and, in AFD, the FFN worker they share).

One call to `step()` is one bundle step: every attention worker's scheduler plans, all workers
execute together (in AFD each on its own thread, with the FFN worker on another, exchanging
hidden states through the transport), then every scheduler takes its results. Requests enter
through `add_request`, routed to the least-loaded attention worker.

Thread safety: `add_request`/`abort` may be called from another thread while `step()` runs;
scheduler state is only touched under `self._lock`, never during model execution.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from afdserve.afd.attention_worker import AttentionWorker
from afdserve.afd.ffn_worker import FFNWorker
from afdserve.afd.router import Router
from afdserve.afd.stats import AFDStats, EngineState, WorkerState
from afdserve.errors import UserInputError
from afdserve.types import Request, SamplingParams, StepPlan, StepResult, TokenEvent


class Engine:
    def __init__(
        self,
        workers: Sequence[AttentionWorker],
        ffn: FFNWorker | None = None,
        seed: int = 0,
        on_close: Sequence = (),
        vocab_size: int | None = None,
        ffn_threads: int | None = None,
    ) -> None:
        self.workers = list(workers)
        self.vocab_size = vocab_size
        self.ffn = ffn
        self.router = Router(self.workers)
        self._pool = (
            ThreadPoolExecutor(len(self.workers), thread_name_prefix="afd") if ffn else None
        )
        self._ffn_stop = threading.Event()
        self._ffn_thread: threading.Thread | None = None
        if ffn is not None:  # the FFN worker's loop runs for the engine's lifetime
            self._ffn_thread = threading.Thread(
                target=_serve_ffn,
                args=(ffn, self._ffn_stop, ffn_threads),
                name="afd-ffn",
                daemon=True,
            )
            self._ffn_thread.start()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._owner: dict[str, int] = {}
        self._step = 0
        self._on_close = list(on_close)
        # wall seconds of the most recent steps; bounded because a server steps forever
        self.step_times: deque[float] = deque(maxlen=4096)
        # AFD metrics: each attention worker's FFN link records its own (see afd/stats.py)
        self._attention_stats = [_link_stats(w) for w in self.workers]

    @property
    def max_model_len(self) -> int:
        return self.workers[0].scheduler.max_model_len

    def healthy(self) -> bool:
        """False once the FFN worker's loop has died (the server then answers 503)."""
        thread = self._ffn_thread
        return thread is None or thread.is_alive()

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> int:
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
            request = Request(
                request_id,
                tuple(prompt_token_ids),
                params,
                time.monotonic() if arrival_time is None else arrival_time,
                seed,
            )
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

    def owner(self, request_id: str) -> int | None:
        """The attention worker serving `request_id` (None once it finished or was aborted)."""
        with self._lock:
            return self._owner.get(request_id)

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
        empty = [StepResult(p.step_id, ()) for p in plans]
        busy = [k for k, p in enumerate(plans) if not p.is_empty]
        if self._pool is None or len(busy) == 1:
            return [
                self._timed_execute(k, p, step) if k in busy else empty[k]
                for k, p in enumerate(plans)
            ]
        futures = {k: self._pool.submit(self._timed_execute, k, plans[k], step) for k in busy}
        return [futures[k].result() if k in futures else empty[k] for k in range(len(plans))]

    def _timed_execute(self, k: int, plan: StepPlan, step: int) -> StepResult:
        t0 = time.perf_counter()
        result = self.workers[k].execute(plan, step)
        self._attention_stats[k].add_active(time.perf_counter() - t0)
        return result

    def state(self, afd: bool = True) -> EngineState:
        """Per-worker queue, KV and counter state (taken under the lock) and, when `afd`, copies
        of the AFD metrics recorders. What the server's metrics and admission control read."""
        with self._lock:
            workers = tuple(
                WorkerState(
                    index=k,
                    num_running=w.scheduler.num_running,
                    num_waiting=w.scheduler.num_waiting,
                    kv_usage=w.scheduler.kv_usage,
                    kv_blocks_used=w.scheduler.allocator.num_used,
                    kv_blocks_total=w.scheduler.allocator.num_usable,
                    load_score=w.load_score(),
                    counters=dataclasses.asdict(w.scheduler.counters),
                    routed=self.router.routed[k],
                )
                for k, w in enumerate(self.workers)
            )
        if not afd:
            return EngineState(workers)
        ffn = (self.ffn.stats.snapshot(),) if self.ffn is not None else ()
        return EngineState(workers, tuple(s.snapshot() for s in self._attention_stats), ffn)

    def close(self) -> None:
        self._ffn_stop.set()
        if self._ffn_thread is not None:
            self._ffn_thread.join(timeout=5.0)
            self._ffn_thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for fn in self._on_close:
            fn()
        self._on_close.clear()


def _serve_ffn(ffn: FFNWorker, stop: threading.Event, threads: int | None) -> None:
    if threads is not None:  # this thread's own OpenMP team size (a per-thread setting)
        import torch

        torch.set_num_threads(threads)
    ffn.serve_forever(stop)


def _link_stats(worker: AttentionWorker) -> AFDStats:
    """The AFD recorder of a worker's FFN link (a fresh one for workers without a link)."""
    stats = getattr(getattr(getattr(worker, "runner", None), "link", None), "stats", None)
    return stats if isinstance(stats, AFDStats) else AFDStats()
