"""The attention worker: the one core every placement runs.

An attention worker owns its scheduler, its KV cache and a runner that executes the scheduler's
plans against the attention part (the FFN half reached through the runner's link). It takes
requests (`add_request`, `abort`) and runs one step at a time (`step`), returning the step's
token events; `status` is what its front needs for routing, admission and metrics.

The in-process engine (launch/inprocess.py) calls `step` on a thread per worker; a worker
process (launch/worker.py) calls it from its loop between reading the front's messages and
sending it the events. Both are placements of this class, so the attention side exists once.

Thread safety: `add_request`, `abort`, `has_unfinished`, `status` and `load_score` may be
called from another thread while `step` runs: the scheduler is only touched under the lock,
never during model execution (an abort between plan and update is one the scheduler handles).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

from afdserve.afd.attention_runner import AttentionRunner
from afdserve.afd.stats import AFDStats, AttentionStatus
from afdserve.engine.scheduler import Scheduler
from afdserve.types import Request, StepPlan, TokenEvent


class AttentionWorker:
    def __init__(self, index: int, scheduler: Scheduler, runner: AttentionRunner) -> None:
        self.index = index
        self.scheduler = scheduler
        self.runner = runner
        self._lock = threading.Lock()
        self._steps = 0
        """Steps this worker ran: its step ids, which its FFN link announces to the FFN."""
        self._in_flight: StepPlan | None = None
        """A plan whose execution was interrupted (StepInterrupted: the FFN side was rebuilt),
        run again by the next `step` before anything new is scheduled. Its KV writes are
        written again with the same values, and nothing was sampled yet."""

    @property
    def stats(self) -> AFDStats:
        """The AFD metrics of this worker's FFN link (written only by the thread in `step`)."""
        return self.runner.link.stats

    @property
    def max_model_len(self) -> int:
        """The longest sequence this worker can hold (the context, or its KV cache if smaller)."""
        return self.scheduler.max_model_len

    def add_request(self, request: Request) -> None:
        """Queue a request (UserInputError for a duplicate id or a prompt that cannot fit)."""
        with self._lock:
            seq_id = self.scheduler.add_request(request)
            if request.generated:  # migrated: its sampler state resumes where it was
                self.runner.history.resume(
                    seq_id, request.params, request.prompt_token_ids, request.generated
                )
                self.runner.grammars.resume(seq_id, request.params, request.generated)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks; False when it is unknown or already finished."""
        with self._lock:
            return self.scheduler.abort_request(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return self._in_flight is not None or self.scheduler.has_unfinished()

    def load_score(self) -> int:
        with self._lock:
            return self.scheduler.load().score

    def cached_prefix_len(self, keys: Sequence[bytes]) -> int:
        """How many of a prompt's leading block keys this worker's prefix cache holds."""
        with self._lock:
            return self.scheduler.allocator.cached_prefix_len(keys)

    def take_kv_events(self) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """Block keys its prefix cache stored and removed since the last call (a worker
        process ships them to its front, which mirrors the cache to route by it)."""
        with self._lock:
            return self.scheduler.allocator.take_events()

    def step(self) -> list[TokenEvent] | None:
        """Plan, execute and account one step; its token events, or None when there was nothing
        to run (an empty plan sends the FFN nothing). A step can run and yield no events (a
        prefill chunk that is not a prompt's last)."""
        plan = self._in_flight
        if plan is None:
            with self._lock:
                plan = self.scheduler.schedule()
            if plan.is_empty:
                return None
        t0 = time.perf_counter()
        self._in_flight = plan
        result = self.runner.execute(plan, self._steps)  # StepInterrupted: kept for the retry
        self._in_flight = None
        self.stats.add_active(time.perf_counter() - t0)
        self.stats.record_step(plan.num_tokens)
        self._steps += 1
        with self._lock:
            events = self.scheduler.update(plan, result)
            states = [st for st in (self.runner.history, self.runner.grammars) if len(st)]
            if states:  # forget the sequences that finished or were aborted
                live = self.scheduler.live_seq_ids
                for st in states:
                    st.retain(live)
            return events

    def status(self) -> AttentionStatus:
        """Queues, KV blocks and counters now (the counters are a copy: safe to keep)."""
        with self._lock:
            s = self.scheduler
            load = s.load()
            return AttentionStatus(
                load=load.score,
                kv_usage=s.kv_usage,
                num_running=load.num_running,
                num_waiting=load.num_waiting,
                kv_blocks_used=load.kv_blocks_used,
                kv_blocks_total=load.kv_blocks_total,
                counters=dataclasses.replace(s.counters),
                kv_host_blocks_total=s.cache_config.num_host_blocks,
            )
