"""The reference replica: one bundle simulated by driving the runtime's own scheduler.

The fast engine (`sim.engine`) re-implements admission, chunked prefill and the microbatch split
as a few per-worker sums, which is what makes it fast, and also what could drift from the
runtime unnoticed. This replica has no policy of its own: each of the r attention workers owns a
real `Scheduler` (configured by `engine.config.worker_configs`, as the runtime configures it),
each step's plans are split by the real `split_microbatches`, and only time comes from the
simulator's cost model. It costs Python work per sequence per step, so it is the yardstick the
fast engine is tested against (tests/sim/test_replica.py), not a replacement for it.

The shape is vidur's: a replica (the bundle), a scheduler per worker, an execution-time
predictor (`plan_load` + `pipeline.time_one_step`: attention per microbatch by its tokens and
context, the FFN by every worker's tokens of a microbatch, the links, the per-layer A->F->A
ping-pong), and a discrete-event loop, a heap of timestamped events as in SimPy, in the order of
the runtime's step loop (`launch.inprocess.Engine`):

- an arrival is routed at once to the worker with the least outstanding work
  (`SchedulerLoad.score`, ties to the lower index: the rule of `afd.router.Router`) and queued in
  its scheduler;
- a step starts when the previous one ends, or on an arrival at an idle bundle: every scheduler
  plans, every plan is split into M microbatches, and the step lasts what the cost model charges
  for all of them together (the bundle waits for its slowest worker);
- at the step's end every scheduler takes its result: each chunk that samples gets a fixed dummy
  token, never EOS, and a request ends by length (`max_tokens` = its output length, with
  `ignore_eos`), so the scheduler decides every admission, chunk, preemption and completion.

Events at the same time: arrivals first, then a step's end, then a step's start, so a step sees
every request that has arrived by its start (as the fast engine does). Only open-loop and offline
request sets with chunked prefill: the scheduler always prefills, and there is no stationary
start.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

import numpy as np

from afdserve.config import EngineConfig
from afdserve.engine.config import worker_configs
from afdserve.engine.microbatch import split_microbatches
from afdserve.engine.scheduler import Scheduler
from afdserve.errors import UserInputError
from afdserve.sim.config import BundleConfig
from afdserve.sim.costs import SimCosts
from afdserve.sim.pipeline import time_one_step
from afdserve.sim.plan_load import plan_load
from afdserve.sim.requests import RequestSet
from afdserve.sim.run import SimRun
from afdserve.types import Request, SampledToken, SamplingParams, StepPlan, StepResult

DUMMY_TOKEN = 0
"""The token every prompt position holds and every step samples (the model is not simulated)."""
DEFAULT_BLOCK_SIZE = EngineConfig.block_size
"""KV block size: the runtime's default, so KV is allocated in the same granules."""

_ARRIVE, _END, _START = 0, 1, 2
"""Event kinds, in the order events at the same time are taken."""


def simulate_reference(
    costs: SimCosts,
    config: BundleConfig,
    requests: RequestSet,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    label: str = "",
) -> SimRun:
    """Simulate `requests` on one unit with the runtime's scheduler until all have finished."""
    t_wall = time.perf_counter()
    run = ReferenceReplica(costs, config, requests, block_size=block_size).run(label)
    run.wall_s = time.perf_counter() - t_wall
    return run


class ReferenceReplica:
    """One unit of r attention workers, each with its own `Scheduler`, run to completion once
    (`run`); `schedulers` and `generated` stay readable afterwards for tests."""

    def __init__(
        self,
        costs: SimCosts,
        config: BundleConfig,
        requests: RequestSet,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        if config.prefill != "chunked":
            raise UserInputError(
                "the reference replica runs the runtime's scheduler, which always prefills: "
                "use prefill='chunked'"
            )
        if requests.initial_progress is not None:
            raise UserInputError(
                "the reference replica starts empty: no stationary start (initial_progress)"
            )
        self.costs, self.cfg, self.reqs = costs, config, requests
        self.prompt_len = np.maximum(np.asarray(requests.prompt_len, dtype=np.int64), 1)
        self.output_len = np.asarray(requests.output_len, dtype=np.int64)
        need = self.prompt_len + self.output_len
        i = int(np.argmax(need))
        cap = config.kv_capacity_tokens
        blocks = None if cap is None else cap // block_size  # whole blocks only
        if blocks is not None and int(need[i]) > blocks * block_size:
            raise UserInputError(
                f"request {i} needs {int(need[i])} KV tokens (prompt + output) but a worker "
                f"holds {blocks * block_size} ({blocks} blocks of {block_size}); raise the KV "
                "capacity or drop the request"
            )
        cache_cfg, sched_cfg = worker_configs(
            max_num_seqs=config.slots,
            max_num_batched_tokens=config.token_budget,
            max_model_len=int(need[i]),  # no model context: every request may run to its end
            block_size=block_size,
            num_blocks=None if blocks is None else blocks + 1,  # + the null block
        )
        self.schedulers = [Scheduler(sched_cfg, cache_cfg) for _ in range(config.attention_workers)]
        n = len(requests)
        self.generated = np.zeros(n, dtype=np.int64)
        """Tokens each request has received."""
        self._first = np.full(n, math.nan)
        self._finish = np.full(n, math.nan)
        self._events: list[tuple[float, int, int, int]] = []
        self._tick = 0  # tie-break: events of one time and kind in the order they were made
        self._in_flight: list[StepPlan] | None = None
        self._start_due = False
        self._log = _StepLog()

    # ---- the event loop -----------------------------------------------------------------------

    def run(self, label: str = "") -> SimRun:
        for q, t in enumerate((self.reqs.arrival_s * 1e3).tolist()):
            self._push(t, _ARRIVE, q)
        while self._events:
            t, kind, _, q = heapq.heappop(self._events)
            if kind == _ARRIVE:
                self._route(q)
                if self._in_flight is None and not self._start_due:
                    self._push(t, _START)
            elif kind == _END:
                self._end_step(t)
                self._push(t, _START)
            else:
                self._start_due = False
                self._start_step(t)
        if any(s.has_unfinished() for s in self.schedulers):
            raise RuntimeError("reference replica stopped with requests unfinished")
        return self._result(label)

    def _push(self, t: float, kind: int, q: int = -1) -> None:
        heapq.heappush(self._events, (t, kind, self._tick, q))
        self._tick += 1
        if kind == _START:
            self._start_due = True

    # ---- what the runtime's step loop does ----------------------------------------------------

    def _route(self, q: int) -> None:
        """Queue request q on the least-loaded worker (the router's rule)."""
        scores = [s.load().score for s in self.schedulers]
        k = min(range(len(scores)), key=lambda i: (scores[i], i))
        self.schedulers[k].add_request(
            Request(
                str(q),
                (DUMMY_TOKEN,) * int(self.prompt_len[q]),
                SamplingParams(max_tokens=int(self.output_len[q]), ignore_eos=True),
                arrival_time=float(self.reqs.arrival_s[q]),
            )
        )

    def _start_step(self, t: float) -> None:
        plans = [s.schedule() for s in self.schedulers]
        if all(p.is_empty for p in plans):
            if any(s.has_unfinished() for s in self.schedulers):
                raise RuntimeError("reference replica stalled: work queued but nothing planned")
            return  # idle until the next arrival
        G = self.cfg.groups
        load = plan_load([split_microbatches(p.chunks, G) for p in plans], G)
        duration, att, ffn, link = time_one_step(
            self.costs,
            self.cfg.pipeline,
            load.tokens,
            load.context,
            load.prefill_tokens,
            load.pairs,
            load.sampled,
        )
        log = self._log
        log.start.append(t)
        log.duration.append(duration)
        log.attention_busy.append(att)
        log.ffn_busy.append(ffn)
        log.link_busy.append(link)
        log.tokens.append(int(sum(load.sampled)))
        log.itl.append(load.itl_tokens)
        log.decode.append(load.decode_slots)
        log.context.append(load.decode_context)
        log.prefill.append(load.prefill_total)
        self._in_flight = plans
        self._push(t + duration, _END)

    def _end_step(self, t: float) -> None:
        """Every scheduler takes its result: a dummy token for each chunk that samples."""
        plans, self._in_flight = self._in_flight, None
        assert plans is not None
        for sched, plan in zip(self.schedulers, plans, strict=True):
            if plan.is_empty:
                continue
            sampled = tuple(SampledToken(c.seq_id, DUMMY_TOKEN) for c in plan.chunks if c.sample)
            for event in sched.update(plan, StepResult(plan.step_id, sampled)):
                q = int(event.request_id)
                if self.generated[q] == 0:
                    self._first[q] = t
                self.generated[q] += 1
                if event.finished:
                    self._finish[q] = t

    # ---- result -------------------------------------------------------------------------------

    def _result(self, label: str) -> SimRun:
        log, r = self._log, self.cfg.attention_workers
        ints = np.int64
        return SimRun(
            config=self.cfg,
            num_layers=self.costs.num_layers,
            step_start=np.asarray(log.start, dtype=np.float64),
            step_duration=np.asarray(log.duration, dtype=np.float64),
            attention_busy=np.asarray(log.attention_busy, dtype=np.float64).reshape(-1, r),
            ffn_busy=np.asarray(log.ffn_busy, dtype=np.float64),
            link_busy=np.asarray(log.link_busy, dtype=np.float64),
            tokens_out=np.asarray(log.tokens, dtype=ints),
            itl_tokens=np.asarray(log.itl, dtype=ints),
            decode_slots=np.asarray(log.decode, dtype=ints),
            decode_context=np.asarray(log.context, dtype=ints),
            prefill_tokens=np.asarray(log.prefill, dtype=ints),
            arrival=self.reqs.arrival_s * 1e3,
            first_token=self._first.copy(),
            finish=self._finish.copy(),
            prompt_len=self.prompt_len,
            output_len=self.output_len,
            warm=np.zeros(len(self.reqs), dtype=bool),
            label=label,
        )


@dataclass
class _StepLog:
    """Per step, what `SimRun` keeps (appended as steps start; see its fields)."""

    start: list[float] = field(default_factory=list)
    duration: list[float] = field(default_factory=list)
    attention_busy: list[list[float]] = field(default_factory=list)
    ffn_busy: list[float] = field(default_factory=list)
    link_busy: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    itl: list[int] = field(default_factory=list)
    decode: list[int] = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    prefill: list[int] = field(default_factory=list)
