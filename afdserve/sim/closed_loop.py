"""Closed loop in bulk: the theory's setting (every freed slot refilled at once, prompts already
in the KV cache, no KV limit) simulated without a per-step loop.

In a closed loop nothing depends on time: a slot that frees after step t is refilled before step
t + 1 with the next request. So the whole schedule (which request decodes on which worker from
which step) follows from the output lengths alone, and is built request by request with a heap
of slot free times, keyed (step, worker) so that the order is exactly the step engine's
(`engine.py` fills free slots worker by worker). The per-step sums then come from difference
arrays: a request on worker k from step s to step e - 1 adds 1 to the decoding count and
P + g0 + (t - s) to the context at each step t in [s, e), i.e. a constant offset P + g0 - s plus
t per decoding slot. Timing is the same vectorised batch timing as everywhere
(`pipeline.py`). The result equals the step engine's (a test checks it), at a fraction of the
cost: the heap is the only Python loop, one iteration per request.
"""

from __future__ import annotations

import heapq
import time

import numpy as np

from afdserve.sim.clock import StepClock
from afdserve.sim.config import BundleConfig
from afdserve.sim.costs import SimCosts
from afdserve.sim.requests import RequestSet
from afdserve.sim.run import SimRun


def can_bulk(config: BundleConfig, requests: RequestSet) -> bool:
    """The bulk path applies to closed loops (all requests at time 0, run until a slot cannot
    be refilled) with no prefill and no KV limit."""
    return config.prefill == "none" and config.kv_capacity_tokens is None and requests.is_offline


def simulate_closed_loop(
    costs: SimCosts,
    config: BundleConfig,
    requests: RequestSet,
    *,
    max_steps: int | None = None,
    timeline_steps: int = 0,
    flush_every: int = 8192,
    label: str = "",
) -> SimRun:
    """Closed-loop run until the first step a slot cannot be refilled (or `max_steps`)."""
    t_wall = time.perf_counter()
    r, B, n = config.attention_workers, config.slots, config.num_slots
    P = np.asarray(requests.prompt_len, dtype=np.int64)
    D = np.asarray(requests.output_len, dtype=np.int64)
    N = P.size
    g0 = np.zeros(N, dtype=np.int64)
    n_init = requests.num_initial
    if n_init:
        g0[:n_init] = requests.initial_progress
    start = np.full(N, -1, dtype=np.int64)
    worker = np.zeros(N, dtype=np.int64)
    # initial placement, as the engine: request i on worker i // B from step 0
    n0 = min(n_init, n)
    start[:n0] = 0
    worker[:n0] = np.arange(n0) // B
    # heap of slot free times as integer keys step * r + worker: popping in key order is the
    # engine's order (by step, then worker by worker)
    heap = ((D[:n0] - g0[:n0]) * r + worker[:n0]).tolist()
    taken = np.bincount(worker[:n0], minlength=r)
    heap.extend(k for k in range(r) for _ in range(B - int(taken[k])))
    heapq.heapify(heap)
    d_r = (D[n0:] * r).tolist()
    limit = None if max_steps is None else max_steps * r
    keys: list[int] = []
    replace = heapq.heapreplace
    for dq in d_r:
        key = heap[0]
        if limit is not None and key >= limit:
            break
        replace(heap, key + dq)
        keys.append(key)
    q = n0 + len(keys)
    if keys:
        k_arr = np.asarray(keys, dtype=np.int64)
        start[n0:q] = k_arr // r
        worker[n0:q] = k_arr % r
    stop = heap[0] // r
    S = int(stop if max_steps is None else min(stop, max_steps))
    placed = np.flatnonzero((start >= 0) & (start < S))
    s0 = start[placed]
    k0 = worker[placed]
    end = np.minimum(s0 + D[placed] - g0[placed], S)  # exclusive
    # difference arrays over (step, worker)
    idx_on = s0 * r + k0
    idx_off = end * r + k0
    size = (S + 1) * r
    cnt = np.bincount(idx_on, minlength=size) - np.bincount(idx_off, minlength=size)
    off_v = (P[placed] + g0[placed] - s0).astype(np.float64)
    off = np.bincount(idx_on, weights=off_v, minlength=size) - np.bincount(
        idx_off, weights=off_v, minlength=size
    )
    nd = np.cumsum(cnt.reshape(S + 1, r), axis=0)[:S]  # [S, r]
    offset = np.cumsum(off.reshape(S + 1, r), axis=0)[:S]
    steps = np.arange(S)
    ctx = np.rint(offset + steps[:, None] * nd).astype(np.int64)  # [S, r]
    fresh = np.bincount(s0[g0[placed] == 0], minlength=S)[:S]
    n_dec = nd.sum(axis=1)
    # timing, in batches
    clock = StepClock(costs, config.pipeline, config.groups, flush_every)
    clock.keep_steps = timeline_steps
    for a in range(0, S, flush_every):
        b = min(S, a + flush_every)
        clock.push_many(nd[a:b], ctx[a:b])
    c = clock.arrays(r)
    t_end = c["start"] + c["duration"]
    first = np.full(N, np.nan)
    finish = np.full(N, np.nan)
    fin_step = start + D - g0 - 1
    ok_first = (start >= 0) & (start < S)
    ok_fin = ok_first & (fin_step < S)
    ok_first[:n_init] = False  # warm requests: first token before time 0
    first[ok_first] = t_end[start[ok_first]]
    finish[ok_fin] = t_end[fin_step[ok_fin]]
    warm = np.zeros(N, dtype=bool)
    warm[:n_init] = True
    run = SimRun(
        config=config,
        num_layers=costs.num_layers,
        step_start=c["start"],
        step_duration=c["duration"],
        attention_busy=c["attention_busy"],
        ffn_busy=c["ffn_busy"],
        link_busy=c["link_busy"],
        tokens_out=n_dec,
        itl_tokens=n_dec - fresh,
        decode_slots=n_dec,
        decode_context=ctx.sum(axis=1),
        prefill_tokens=np.zeros(S, dtype=np.int64),
        arrival=np.asarray(requests.arrival_s) * 1e3,
        first_token=first,
        finish=finish,
        prompt_len=P,
        output_len=D,
        warm=warm,
        timeline=list(clock.kept_stages),
        label=label,
    )
    run.wall_s = time.perf_counter() - t_wall
    return run
