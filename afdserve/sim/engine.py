"""The step simulator of one unit: r attention workers with B slots each, sharing one FFN.

**State.** The cost model is affine in the context a worker reads, so what a step costs depends on
each worker's slots only through two sums: how many slots decode, and how many context tokens they
read (prompt + tokens generated, per slot). Every decoding slot advances by exactly one token a
step, so both sums evolve exactly without touching the slots:

    context[k] += decoding[k]                 after every step
    decoding[k], context[k] -= (1, P + D)     when a request ends (known when it starts decoding)

A request's last step is known the moment it starts decoding (start + remaining - 1), so
completions go into a calendar (a ring of per-worker counts, context and KV to release, indexed
by step). Per request, numpy arrays keep its lengths and the steps of its first and last token.
Prefill is the only per-request work inside a step: each worker keeps a FIFO of its prefilling
requests and hands out chunks from its token budget after its decode tokens. So one Python
iteration is one bundle step at a cost of a dozen small-array operations, independent of the
number of slots, and admission is O(1) Python work per request.

**A step**, like the runtime's:
1. admit waiting requests into free slots, first come first served, bounded by slots and by each
   worker's KV capacity (a request reserves prompt + output tokens), to the least-loaded worker;
2. every decoding slot computes one token; prefilling requests take chunks of the rest of the
   worker's token budget in admission order, and the one whose chunk reaches the end of its
   prompt samples its first token (and decodes from the next step);
3. each worker splits its tokens into M microbatches of near-equal token counts (prefill chunks
   are not split; decode tokens fill the microbatches up evenly, their context in proportion);
4. the per-(worker, microbatch) loads go to the clock, which times steps in vectorised batches
   (`clock.py`, `pipeline.py`): times only matter for arrivals, so they are resolved lazily.

Per-request latencies come from the step indices of a request's first and last token and the
step clock; ITL samples are step durations weighted by the tokens each step generated.

Approximations, on purpose, and what they cost against the reference replica (`sim.replica`,
on the runtime's scheduler): exact with r = 1 and M = 1; a few percent from one queue per bundle
with r > 1; optimistic with M > 1 under arrivals (own microbatch per prefill chunk, where the
runtime splits contiguously) and when KV binds (the whole output reserved at admission, where
the runtime preempts). The numbers are in docs/simulator.md and tests/sim/test_replica.py.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

from afdserve.errors import UserInputError
from afdserve.sim.clock import StepClock
from afdserve.sim.config import BundleConfig
from afdserve.sim.costs import SimCosts
from afdserve.sim.requests import RequestSet
from afdserve.sim.run import SimRun

MS_PER_S = 1e3
HORIZON = 256
"""Steps the arrival look-ahead bounds (contexts may grow by this many tokens meanwhile)."""


def simulate(
    costs: SimCosts,
    config: BundleConfig,
    requests: RequestSet,
    *,
    stop_when_unfilled: bool = False,
    max_steps: int | None = None,
    timeline_steps: int = 0,
    flush_every: int = 4096,
    label: str = "",
) -> SimRun:
    """Simulate `requests` on one unit until every request has finished (or `max_steps`, or,
    with `stop_when_unfilled`, the first step some slot stays empty: the end of a closed loop)."""
    t_wall = time.perf_counter()
    sim = _Engine(costs, config, requests, flush_every)
    sim.clock.keep_steps = timeline_steps
    sim.run(stop_when_unfilled, max_steps)
    run = sim.result(label)
    run.wall_s = time.perf_counter() - t_wall
    return run


class _Engine:
    def __init__(
        self, costs: SimCosts, config: BundleConfig, requests: RequestSet, flush_every: int
    ) -> None:
        self.costs, self.cfg, self.reqs = costs, config, requests
        r, B, G = config.attention_workers, config.slots, config.groups
        self.r, self.B, self.G = r, B, G
        self.chunked = config.prefill == "chunked"
        if self.chunked and config.token_budget < B:
            raise UserInputError(
                f"token_budget ({config.token_budget}) must be >= slots ({B}) so that every "
                "decoding slot gets its token each step"
            )
        P_all = np.asarray(requests.prompt_len, dtype=np.int64)
        if self.chunked:  # a prompt of 0 tokens still feeds one token (the runtime needs one)
            P_all = np.maximum(P_all, 1)
        self.P_all = P_all
        self.D_all = np.asarray(requests.output_len, dtype=np.int64)
        self.P_list = P_all.tolist()
        cached = requests.cached_len
        self.C_list = [0] * len(self.P_list) if cached is None else cached.tolist()
        self.D_list = self.D_all.tolist()
        self.arr_ms = requests.arrival_s * MS_PER_S
        self.N = N = len(requests)
        self.cap = config.kv_capacity_tokens
        if self.cap is not None:
            need = P_all + self.D_all
            i = int(np.argmax(need))
            if int(need[i]) > self.cap:
                raise UserInputError(
                    f"request {i} needs {int(need[i])} KV tokens (prompt + output) but a worker "
                    f"holds {self.cap}; raise the KV capacity or drop the request"
                )
        self.clock = StepClock(costs, config.pipeline, G, flush_every)
        # per-worker state
        self.n_dec = np.zeros(r, dtype=np.int64)  # decoding slots
        self.ctx = np.zeros(r, dtype=np.int64)  # context they read at the next step
        self.free = np.full(r, B, dtype=np.int64)  # free slots
        self.kv = np.zeros(r, dtype=np.int64)  # KV tokens reserved
        self.queues: list[deque[list[int]]] = [deque() for _ in range(r)]  # [req, P, done]
        self.n_dec_total = 0
        self.ctx_total = 0
        self.n_free_total = r * B
        self.n_prefilling = 0
        self.n_fresh = 0  # no-prefill mode: decoding slots whose next token is their first
        # completion calendar: after step t, ring_n[t % H][k] requests end on worker k, holding
        # ring_pd[t % H][k] tokens (a finished request's context and KV reservation are both
        # P + D). Plain lists: a few updates per request are cheaper than numpy scatter-adds.
        self.H = int(self.D_all.max()) + 2
        self.ring_n = [[0] * r for _ in range(self.H)]
        self.ring_pd = [[0] * r for _ in range(self.H)]
        self.ring_count = [0] * self.H
        # per request (step indices)
        self.first_step = np.full(N, -1, dtype=np.int64)
        self.finish_step = np.full(N, -1, dtype=np.int64)
        self.warm = np.zeros(N, dtype=bool)
        self.head = 0  # next request to admit
        self.arrived = 0  # requests [head, arrived) are waiting
        self.step = 0
        self.check_at = 0  # no arrival can have come before the step with this index
        self.P_max = int(P_all.max())
        # per-step counters
        self.s_tokens: list[int] = []
        self.s_itl: list[int] = []
        self.s_dec: list[int] = []
        self.s_ctx: list[int] = []
        self.s_pref: list[int] = []
        self._zeros = np.zeros((r, G))
        self._zeros.setflags(write=False)
        self._mb = np.arange(G)[None, :]
        self._place_initial()

    # ---- requests entering and leaving --------------------------------------------------------

    def _place_initial(self) -> None:
        g = self.reqs.initial_progress
        if g is None:
            return
        n = g.size
        if n > self.r * self.B:
            raise UserInputError(f"{n} initial requests for {self.r * self.B} slots")
        ids = np.arange(n)
        workers = ids // self.B
        self._take_slots(ids, workers)
        self._join(ids, workers, g, 0)
        if not self.chunked:
            self.n_fresh += int(np.count_nonzero(g == 0))
        self.warm[:n] = True
        self.head = n

    def _take_slots(self, ids: np.ndarray, workers: np.ndarray) -> None:
        self.free -= np.bincount(workers, minlength=self.r)
        self.n_free_total -= ids.size
        if self.cap is not None:
            need = self.P_all[ids] + self.D_all[ids]
            self.kv += np.bincount(workers, weights=need, minlength=self.r).astype(np.int64)

    def _join(self, ids: np.ndarray, workers: np.ndarray, g0, t_join: int) -> None:
        """Requests `ids` start decoding on `workers` at step t_join with g0 tokens generated:
        add them to the sums and put their completion (step t_join + D - g0 - 1) in the ring."""
        P, D = self.P_all[ids], self.D_all[ids]
        t_f = t_join + D - g0 - 1
        self.finish_step[ids] = t_f
        c0 = P + g0
        H, ring_n, ring_pd, count = self.H, self.ring_n, self.ring_pd, self.ring_count
        if ids.size > 64:
            self.n_dec += np.bincount(workers, minlength=self.r)
            self.ctx += np.bincount(workers, weights=c0, minlength=self.r).astype(np.int64)
            self.ctx_total += int(c0.sum())
            for t, k, pd in zip(t_f.tolist(), workers.tolist(), (P + D).tolist(), strict=True):
                h = t % H
                ring_n[h][k] += 1
                ring_pd[h][k] += pd
                count[h] += 1
        else:  # a few requests: one plain loop beats a dozen numpy calls
            dn = [0] * self.r
            dc = [0] * self.r
            ctx_add = 0
            for t, k, pd, c in zip(
                t_f.tolist(), workers.tolist(), (P + D).tolist(), c0.tolist(), strict=True
            ):
                h = t % H
                ring_n[h][k] += 1
                ring_pd[h][k] += pd
                count[h] += 1
                dn[k] += 1
                dc[k] += c
                ctx_add += c
            self.n_dec += dn
            self.ctx += dc
            self.ctx_total += ctx_add
        self.n_dec_total += ids.size

    def _admit(self) -> None:
        want = min(self.arrived - self.head, self.n_free_total)
        if self.cap is None:
            workers = self._most_free_workers(want)
        else:
            workers = self._kv_workers(want)
        if workers.size == 0:
            return
        self.check_at = 0  # more work: the step-time bound no longer holds
        ids = np.arange(self.head, self.head + workers.size)
        self._take_slots(ids, workers)
        if self.chunked:
            for q, k in zip(ids.tolist(), workers.tolist(), strict=True):
                self.queues[k].append([q, self.P_list[q], self.C_list[q]])
            self.n_prefilling += ids.size
        else:
            self._join(ids, workers, 0, self.step)
            self.first_step[ids] = self.step  # every running slot decodes this very step
            self.n_fresh += ids.size
        self.head += ids.size

    def _most_free_workers(self, want: int) -> np.ndarray:
        """Workers of the next `want` requests: each goes to the worker with the most free slots
        (ties: less resident context, then lower index), vectorised over the free slots."""
        free = self.free
        w = np.repeat(np.arange(self.r), free)  # one ticket per free slot
        if want == w.size:  # every free slot is filled
            return w
        j = np.arange(w.size) - np.repeat(np.cumsum(free) - free, free)
        order = np.lexsort((w, self.ctx[w], j - free[w]))
        return w[order[:want]]

    def _kv_workers(self, want: int) -> np.ndarray:
        """FCFS with KV: each request goes to the worker with a free slot and the most free KV;
        stop at the first request no worker can hold."""
        free = self.free.tolist()
        kv_free = (self.cap - self.kv).tolist()
        out: list[int] = []
        for q in range(self.head, self.head + want):
            need = self.P_list[q] + self.D_list[q]
            best = -1
            for k in range(self.r):
                if free[k] and kv_free[k] >= need and (best < 0 or kv_free[k] > kv_free[best]):
                    best = k
            if best < 0:
                break  # nobody overtakes the head of the queue
            free[best] -= 1
            kv_free[best] -= need
            out.append(best)
        return np.asarray(out, dtype=np.int64)

    # ---- main loop ------------------------------------------------------------------------

    def run(self, stop_when_unfilled: bool, max_steps: int | None) -> None:
        offline = self.reqs.is_offline
        if offline:
            self.arrived = self.N
        n_slots = self.r * self.B
        while True:
            if max_steps is not None and self.step >= max_steps:
                break
            if self.n_free_total and self.head < self.N:
                if (
                    not offline
                    and self.arrived < self.N
                    and self.arrived - self.head < self.n_free_total
                    and self.step >= self.check_at
                ):
                    self._update_arrivals()
                if self.arrived > self.head:
                    self._admit()
            busy = n_slots - self.n_free_total
            if busy == 0:
                if self.head >= self.N:
                    break
                if self.arrived == self.head:  # idle until the next arrival
                    self.clock.flush()
                    self.clock.jump_to(float(self.arr_ms[self.arrived]))
                    self._update_arrivals()
                    continue
                raise RuntimeError("simulator stalled: nothing running and nothing admissible")
            if stop_when_unfilled and busy < n_slots:
                break
            self._step()

    def _update_arrivals(self) -> None:
        """Time the pending steps, take every request that has arrived by now, and work out how
        many steps surely start before the next arrival (no need to look again until then)."""
        self.clock.flush()
        now = self.clock.now_ms
        a = self.arr_ms
        self.arrived = max(self.arrived, int(np.searchsorted(a, now, side="right")))
        self.check_at = self.step + 1
        if self.arrived < self.N:
            u = self._step_upper(HORIZON)
            if u > 0:
                j = math.ceil((float(a[self.arrived]) - now) / u)
                self.check_at = self.step + max(1, min(j, HORIZON))

    def _step_upper(self, horizon: int) -> float:
        """An upper bound (ms) on each of the next `horizon` steps if nobody is admitted.

        Decode contexts grow by at most one token a step, completions only remove work, and a
        queued prefill adds at most its prompt (plus the horizon) of decode context once it
        decodes; prefill work per worker is bounded by the token budget and the longest prompt.
        Each microbatch's attention is at most its worker's whole attention, and a step is at
        most the sum over layers and microbatches of its slowest job of each kind (a path
        through the job graph visits at most one job of each kind per layer and microbatch)."""
        c, cfg = self.costs, self.cfg
        s = c.stages
        L, G = c.num_layers, self.G
        ctx_max = float((self.ctx + horizon * self.n_dec).max())
        attn_extra = 0.0
        if self.n_prefilling:
            queued = sum(len(q) for q in self.queues)
            budget = cfg.token_budget
            ctx_max += queued * (2 * self.P_max + horizon)
            attn_extra = c.prefill_token_ms * budget + c.prefill_pair_ms * budget * self.P_max
            tok_max, tok_sum = budget, self.r * budget
        else:
            tok_max, tok_sum = int(self.n_dec.max()), self.n_dec_total
        attn = s.attention.alpha * ctx_max + s.attention.beta + attn_extra
        # an upper bound for a roofline FFN too: sum of G max(alpha n_g, beta) <= alpha n + G beta
        ffn = s.ffn.alpha * tok_sum + G * (s.ffn.beta + s.ffn.fixed)
        post = (
            c.step_alpha_ms * tok_max
            + c.step_prefill_token_ms * (cfg.token_budget if self.n_prefilling else 0)
            + c.step_beta_ms
            + c.afd_step_ms
            + c.afd_microbatch_ms * (G - 1)
        )
        if cfg.pipeline == "colocated":
            return L * (G * attn + ffn) + post
        link_tok = tok_sum if s.comm_scales_with == "rB" else tok_max
        link = s.comm.alpha * link_tok + s.comm.beta
        if cfg.pipeline == "serial":
            return L * self.r * G * (attn + 2 * link) + L * ffn + self.r * post
        return L * (G * attn + 2 * G * link + ffn) + post

    def _step(self) -> None:
        nd = self.n_dec
        n_first, n_pref_tok = 0, 0
        done: list[tuple[int, int]] = []
        if self.n_prefilling:
            loads, done, n_pref_tok = self._prefill()
            n_first = len(done)
            self.clock.push_explicit(nd, self.ctx, loads)
        else:
            self.clock.push_decode(nd, self.ctx)
        self.s_tokens.append(self.n_dec_total + n_first)
        self.s_itl.append(self.n_dec_total - self.n_fresh)
        self.s_dec.append(self.n_dec_total)
        self.s_ctx.append(self.ctx_total)
        self.s_pref.append(n_pref_tok)
        self.n_fresh = 0
        # advance: every decoding slot has one more token; then completions leave
        self.ctx += nd
        self.ctx_total += self.n_dec_total
        t = self.step
        h = t % self.H
        n_done = self.ring_count[h]
        if n_done:
            r = self.r
            row_n = np.array(self.ring_n[h], dtype=np.int64)
            row_pd = np.array(self.ring_pd[h], dtype=np.int64)
            nd -= row_n
            self.ctx -= row_pd
            self.free += row_n
            if self.cap is not None:
                self.kv -= row_pd
            self.n_dec_total -= n_done
            self.n_free_total += n_done
            self.ctx_total -= sum(self.ring_pd[h])
            self.ring_n[h] = [0] * r
            self.ring_pd[h] = [0] * r
            self.ring_count[h] = 0
        if done:  # prefill finished this step: first token now, decode from t + 1
            ks = np.asarray([k for k, _ in done], dtype=np.int64)
            qs = np.asarray([q for _, q in done], dtype=np.int64)
            self.first_step[qs] = t
            more = self.D_all[qs] > 1
            if more.any():
                self._join(qs[more], ks[more], 1, t + 1)
            if not more.all():
                one = ~more
                self.finish_step[qs[one]] = t
                self.free += np.bincount(ks[one], minlength=self.r)
                self.n_free_total += int(one.sum())
                if self.cap is not None:
                    self.kv -= np.bincount(
                        ks[one], weights=self.P_all[qs[one]] + 1, minlength=self.r
                    ).astype(np.int64)
        self.step += 1

    def _prefill(self) -> tuple[tuple[np.ndarray, ...], list[tuple[int, int]], int]:
        """Hand out prefill chunks: returns the step's per-(worker, microbatch) loads, the
        (worker, request) pairs whose prefill completes, and the prefill tokens computed.
        Plain lists inside: a handful of workers and chunks, where numpy calls cost more."""
        G = self.G
        nd_all, ctx_all = self.n_dec.tolist(), self.ctx.tolist()
        budget_cap = self.cfg.token_budget
        tok_rows, ctx_rows, pt_rows, pair_rows = [], [], [], []
        sampled = [float(n) for n in nd_all]
        done: list[tuple[int, int]] = []
        total = 0
        for k, queue in enumerate(self.queues):
            n, c = nd_all[k], ctx_all[k]
            if not queue:
                base, extra = divmod(n, G)
                row = [base + (1 if i < extra else 0) for i in range(G)]
                tok_rows.append(row)
                ctx_rows.append([c * t / n if n else 0.0 for t in row])
                pt_rows.append([0] * G)
                pair_rows.append([0.0] * G)
                continue
            budget = budget_cap - n
            loads = [0] * G
            cctx = [0.0] * G
            pairs = [0.0] * G
            for entry in queue:
                if budget <= 0:
                    break
                q, P, d0 = entry
                ch = min(P - d0, budget)
                budget -= ch
                entry[2] = d0 + ch
                if entry[2] == P:
                    done.append((k, q))
                    sampled[k] += 1
                i = loads.index(min(loads)) if G > 1 else 0  # a chunk is not split
                total += ch
                loads[i] += ch
                cctx[i] += d0 + ch  # its attention reads its whole context so far
                pairs[i] += ch * d0 + ch * (ch + 1) / 2.0
            while queue and queue[0][2] == queue[0][1]:
                queue.popleft()
                self.n_prefilling -= 1
            # decode tokens even out the microbatches; their context follows in proportion
            dec = _water_fill(loads, n) if G > 1 else [n]
            tok_rows.append([loads[i] + dec[i] for i in range(G)])
            ctx_rows.append([cctx[i] + (c * dec[i] / n if n else 0.0) for i in range(G)])
            pt_rows.append(loads)
            pair_rows.append(pairs)
        loads_out = (
            np.asarray(tok_rows, dtype=np.float64),
            np.asarray(ctx_rows, dtype=np.float64),
            np.asarray(pt_rows, dtype=np.float64),
            np.asarray(pair_rows, dtype=np.float64),
            np.asarray(sampled, dtype=np.float64),
        )
        return loads_out, done, total

    # ---- result ---------------------------------------------------------------------------

    def result(self, label: str) -> SimRun:
        c = self.clock.arrays(self.r)
        end = c["start"] + c["duration"]
        return SimRun(
            config=self.cfg,
            num_layers=self.costs.num_layers,
            step_start=c["start"],
            step_duration=c["duration"],
            attention_busy=c["attention_busy"],
            ffn_busy=c["ffn_busy"],
            link_busy=c["link_busy"],
            tokens_out=np.asarray(self.s_tokens, dtype=np.int64),
            itl_tokens=np.asarray(self.s_itl, dtype=np.int64),
            decode_slots=np.asarray(self.s_dec, dtype=np.int64),
            decode_context=np.asarray(self.s_ctx, dtype=np.int64),
            prefill_tokens=np.asarray(self.s_pref, dtype=np.int64),
            arrival=self.arr_ms.copy(),
            first_token=_at(end, self.first_step),
            finish=_at(end, self.finish_step),
            prompt_len=self.P_all,
            output_len=self.D_all,
            warm=self.warm,
            timeline=list(self.clock.kept_stages),
            label=label,
        )


def _water_fill(loads: list[float], n: int) -> list[int]:
    """Split n decode tokens over microbatches already holding `loads` tokens so that the totals
    are as even as possible (lowest first)."""
    G = len(loads)
    out = [0] * G
    if n <= 0:
        return out
    order = sorted(range(G), key=lambda i: loads[i])
    level = 0.0
    for j in range(1, G + 1):
        level = (n + sum(loads[order[i]] for i in range(j))) / j
        if j == G or level <= loads[order[j]]:
            break
    filled = [order[i] for i in range(j)]
    give = [max(0, int(level - loads[i])) for i in filled]
    rest = n - sum(give)
    for i in range(len(filled)):
        if rest <= 0:
            break
        give[i] += 1
        rest -= 1
    for i, g in zip(filled, give, strict=True):
        out[i] = g
    return out


def _at(end: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Times (ms) at the end of the given steps; nan where the step is -1 or never ran."""
    out = np.full(steps.shape, np.nan)
    ok = (steps >= 0) & (steps < end.size)
    out[ok] = end[steps[ok]]
    return out
