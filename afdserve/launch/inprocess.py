"""The in-process placement: r attention workers (and, in AFD, the FFN worker they share) on
threads of this process.

The workers are the same `AttentionWorker` and `FFNWorker` cores that worker processes run
(launch/worker.py); only the placement differs. One call to `step()` runs one step of every
attention worker that has work, each on its own thread (in AFD the FFN worker's loop runs on
another, batching what they send it), and returns their token events. Requests enter through
`add_request`: admitted once (afd/admission.py) and routed to the least-loaded worker.

Thread safety: `add_request`/`abort`/`state` may be called from another thread while `step()`
runs; each worker guards its own scheduler, and this engine's request table is under
`self._lock`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from afdserve.afd.admission import admit
from afdserve.afd.attention_worker import AttentionWorker
from afdserve.afd.ffn_worker import FFNWorker
from afdserve.afd.router import Router
from afdserve.afd.stats import EngineState, WorkerState
from afdserve.errors import UserInputError
from afdserve.launch.drain import Drained
from afdserve.model.threads import ThreadCount
from afdserve.types import SamplingParams, TokenEvent

if TYPE_CHECKING:
    from afdserve.launch.balancer import LocalBalancer


class Engine:
    def __init__(
        self,
        workers: Sequence[AttentionWorker],
        vocab_size: int,
        ffns: Sequence[FFNWorker] = (),
        seed: int = 0,
        on_close: Sequence = (),
        ffn_threads: int | None = None,
        tokenizer_file: Path | None = None,
        balancer: LocalBalancer | None = None,
    ) -> None:
        self.workers = list(workers)
        self.balancer = balancer
        """Expert parallelism: counts expert load and installs EPLB re-placements between
        steps (launch/balancer.py)."""
        self.tokenizer_file = tokenizer_file
        """The model's tokenizer.json (structured outputs need it; admission checks)."""
        self.vocab_size = vocab_size
        self.ffns = list(ffns)
        self.router = Router(self.workers, self._prefix_block_size())
        threads = ThreadCount.capture()  # every compute thread runs with this one's count
        self._pool = (
            ThreadPoolExecutor(
                len(self.workers), thread_name_prefix="afd", initializer=threads.apply
            )
            if ffns
            else None
        )
        self._ffn_stop = threading.Event()
        self._ffn_threads: list[threading.Thread] = []
        for j, ffn in enumerate(self.ffns):  # each FFN worker's loop runs for the engine's life
            thread = threading.Thread(
                target=_serve_ffn,
                args=(ffn, self._ffn_stop, ThreadCount.capture(ffn_threads)),
                name=f"afd-ffn{j}",
                daemon=True,
            )
            thread.start()
            self._ffn_threads.append(thread)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._owner: dict[str, int] = {}
        self._drained = Drained(len(self.workers))
        """Attention workers an operator drained (launch/drain.py)."""
        self._on_close = list(on_close)
        # wall seconds of the most recent steps; bounded because a server steps forever
        self.step_times: deque[float] = deque(maxlen=4096)

    def _prefix_block_size(self) -> int:
        """The workers' KV block size when they cache prefixes (cache-aware routing), else 0."""
        caches = {w.scheduler.cache_config for w in self.workers}
        if (
            all(c.enable_prefix_caching for c in caches)
            and len({c.block_size for c in caches}) == 1
        ):
            return next(iter(caches)).block_size
        return 0

    @property
    def max_model_len(self) -> int:
        """The longest sequence every worker holds (the context, or a KV cache if smaller)."""
        return min(w.max_model_len for w in self.workers)

    def healthy(self) -> bool:
        """False once an FFN worker's loop has died (the server then answers 503)."""
        return all(t.is_alive() for t in self._ffn_threads)

    def problems(self) -> list[str]:
        """While it serves, only the attention workers an operator drained: every worker is a
        thread of this process, which lives or dies whole (a dead FFN thread is
        `healthy() == False`)."""
        out = [] if self.healthy() else ["an FFN worker thread died"]
        with self._lock:
            return out + self._drained.problems()

    def drain(self, rank: int, drained: bool = True) -> int:
        """Route no new request to attention worker `rank` (what it holds finishes there), or
        route to it again; returns the requests it holds (launch/drain.py)."""
        with self._lock:
            self._drained.set(rank, drained)
            return sum(1 for k in self._owner.values() if k == rank)

    def add_worker(self, rank: int | None = None) -> int:
        """Attention workers join at run time only over worker processes."""
        raise UserInputError(
            "the in-process engine cannot add attention workers at run time: serve over "
            "worker processes (--transport shm or tcp) with --max-attention-workers"
        )

    def remove_worker(self, rank: int, migrate: bool = False) -> int:
        """Attention workers leave at run time only over worker processes (drain one here)."""
        raise UserInputError(
            "the in-process engine cannot remove attention workers at run time: drain one "
            "instead (POST /admin/attention_workers/{rank}/drain)"
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> int:
        """Admit a request and queue it on the least-loaded attention worker; returns the
        worker's index."""
        with self._lock:
            request = admit(
                request_id,
                prompt_token_ids,
                params,
                arrival_time,
                vocab_size=self.vocab_size,
                max_model_len=self.max_model_len,
                rng=self._rng,
                live=self._owner,
                tokenizer_file=self.tokenizer_file,
            )
            k = self.router.choose(
                self._drained.among(range(len(self.workers))), request.prompt_token_ids
            )
            self.workers[k].add_request(request)
            self._owner[request_id] = k
            return k

    def abort(self, request_id: str) -> bool:
        with self._lock:
            k = self._owner.pop(request_id, None)
            return k is not None and self.workers[k].abort(request_id)

    def has_unfinished(self) -> bool:
        return any(w.has_unfinished() for w in self.workers)

    def poll_idle(self) -> None:
        """Nothing to read: in-process workers report by being looked at (`state`)."""

    def owner(self, request_id: str) -> int | None:
        """The attention worker serving `request_id` (None once it finished or was aborted)."""
        with self._lock:
            return self._owner.get(request_id)

    def step(self) -> list[TokenEvent]:
        """One step of every attention worker with work, together (each on its own thread in
        AFD); their token events in worker order (empty if none had anything to run)."""
        busy = [w for w in self.workers if w.has_unfinished()]
        if not busy:
            return []
        if self.balancer is not None:  # no step in flight: a re-placement goes in now
            self.balancer.before_step()
        t0 = time.perf_counter()
        if self._pool is None or len(busy) == 1:
            outputs = [w.step() for w in busy]
        else:
            outputs = [f.result() for f in [self._pool.submit(w.step) for w in busy]]
        if self.balancer is not None:
            self.balancer.after_step()
        if all(out is None for out in outputs):
            return []
        self.step_times.append(time.perf_counter() - t0)
        events = [e for out in outputs if out for e in out]
        with self._lock:
            for e in events:
                if e.finished:
                    self._owner.pop(e.request_id, None)
        return events

    def state(self, afd: bool = True) -> EngineState:
        """Per-worker queue, KV and counter state and, when `afd`, copies of the AFD metrics
        recorders. What the server's metrics and admission control read."""
        with self._lock:
            routed = list(self.router.routed)
            reasons = dict(self.router.by_reason)
        workers = tuple(
            WorkerState.of(k, w.status(), routed[k]) for k, w in enumerate(self.workers)
        )
        if not afd:
            return EngineState(workers, routing=reasons)
        ffn = tuple(f.stats.snapshot() for f in self.ffns)
        experts = self.balancer.state() if self.balancer is not None else None
        return EngineState(
            workers,
            tuple(w.stats.snapshot() for w in self.workers),
            ffn,
            experts,
            routing=reasons,
        )

    def close(self) -> None:
        self._ffn_stop.set()
        for thread in self._ffn_threads:
            thread.join(timeout=5.0)
        self._ffn_threads = []
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for fn in self._on_close:
            fn()
        self._on_close.clear()


def _serve_ffn(ffn: FFNWorker, stop: threading.Event, threads: ThreadCount) -> None:
    threads.apply()  # this thread's own OpenMP team size (model/threads.py)
    ffn.serve_forever(stop)
