"""Step timing: from what each (worker, microbatch) computes in a step to the step's duration.

Everything is vectorised over a batch of S steps. Steps are independent here because every
step ends at a barrier (the bundle waits for its slowest attention worker), so the simulator
records the loads of many steps and times them in one go.

Legend: S = steps, r = attention workers, G = microbatches (groups), L = layers.

**The microbatch pipeline, exactly.** Within a step every layer has the same stage times (the
contexts and token counts do not change between layers), and the runtime's loop processes, per
layer l and microbatch i: attention A(k,l,i) on worker k, the A->F transfer U(k,l,i), the FFN
F(l,i) over every worker's tokens of microbatch i, and the F->A transfer D(k,l,i); attention of
layer l+1 for microbatch i waits for D(k,l,i). Each of attention (per worker), the up link (per
worker), the FFN and the down link (per worker) is one server that takes its jobs in (l, i)
order. With x the completion times of one server, each server is the recurrence

    x_i = max(x_{i-1}, ready_i) + t_i,   i.e.   x_i = S_i + max(x_{-1}, max_{j<=i} (ready_j - S_{j-1}))

with S the prefix sums of t: a cumulative sum and a running maximum over the microbatch axis.
A layer is four such scans. The map from one layer's completion times to the next is max-plus
linear and shift-invariant (all inputs + c gives all outputs + c), so once a layer moves every
relevant completion time by the same amount lambda, every later layer does too, and the rest of
the step is extrapolated exactly: finish = x + (L - 1 - l) * lambda. Steps that never reach that
regime are run through all L layers. With `comm_scales_with="rB"` the links are one server on
the FFN's side carrying every worker's tokens of a microbatch in one transfer.

M = 1 reproduces the unpipelined sum L * (attention + up + FFN + down) + post; as M grows with
no fixed costs the step approaches L * max(stage loads), the planner's cycle (both are tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from afdserve.sim.costs import SimCosts

_NEG = -np.inf
_REL_TOL = 1e-10


@dataclass
class StepLoad:
    """What each (worker, microbatch) computes in each of S steps."""

    tokens: np.ndarray
    """[S, r, G] tokens computed (decode tokens plus prefill-chunk tokens)."""
    context: np.ndarray
    """[S, r, G] context tokens read by attention (decode contexts plus prefill chunk ends)."""
    prefill_tokens: np.ndarray
    """[S, r, G] of which prefill-chunk tokens."""
    prefill_pairs: np.ndarray
    """[S, r, G] (query, context) pairs of the prefill chunks."""
    sampled: np.ndarray
    """[S, r] sequences that sample a token (one LM-head row each)."""

    @property
    def num_steps(self) -> int:
        return int(self.tokens.shape[0])


def decode_load(decoding: np.ndarray, context: np.ndarray, groups: int) -> StepLoad:
    """Loads of decode-only steps from per-worker sums ([S, r] each): each worker's decode tokens
    split into `groups` microbatches as evenly as possible, their context in proportion."""
    nd = decoding.astype(np.int64)
    G = groups
    base, extra = nd // G, nd % G
    tok = base[..., None] + (np.arange(G) < extra[..., None])  # [S, r, G]
    share = tok / np.maximum(nd, 1)[..., None]
    ctx = context[..., None] * share
    zeros = np.zeros(tok.shape)
    return StepLoad(tok.astype(np.float64), ctx, zeros, zeros.copy(), nd.astype(np.float64))


@dataclass
class StageTimes:
    """Per-layer stage times (ms) of S steps."""

    attention: np.ndarray  # [S, r, G]
    up: np.ndarray  # [S, r, G] per worker link, or [S, G] for one shared link
    down: np.ndarray  # like up
    ffn: np.ndarray  # [S, G]
    post: np.ndarray  # [S, r] per-step work outside the layers, after the last layer
    sends: np.ndarray  # [S, r, G] bool: the (worker, microbatch) has tokens
    shared_link: bool

    @staticmethod
    def concat(parts: list[StageTimes]) -> StageTimes:
        """The steps of several batches, in order."""
        return StageTimes(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("attention", "up", "down", "ffn", "post", "sends")
            ),
            parts[0].shared_link,
        )


@dataclass
class StepTiming:
    """Durations and busy times (ms) of S steps."""

    duration: np.ndarray  # [S]
    attention_busy: np.ndarray  # [S, r]
    ffn_busy: np.ndarray  # [S]
    link_busy: np.ndarray  # [S] busiest link


def stage_times(costs: SimCosts, load: StepLoad, pipeline: str) -> StageTimes:
    """Affine stage costs of every (step, worker, microbatch); empty ones cost nothing."""
    s = costs.stages
    tok = load.tokens.astype(np.float64)
    sends = tok > 0
    attn = (
        s.attention.alpha * load.context
        + costs.prefill_token_ms * load.prefill_tokens
        + costs.prefill_pair_ms * load.prefill_pairs
        + s.attention.beta
    )
    attn = np.where(sends, attn, 0.0)
    ffn_tok = tok.sum(axis=1)  # [S, G]
    colocated = pipeline == "colocated"
    ffn_work = (
        np.maximum(s.ffn.alpha * ffn_tok, s.ffn.beta)
        if s.ffn.combine == "max"
        else s.ffn.alpha * ffn_tok + s.ffn.beta
    ) + s.ffn.fixed  # [S, G]
    ffn = np.where(ffn_tok > 0, ffn_work, 0.0)
    shared = s.comm_scales_with == "rB" and not colocated
    if colocated:
        # an expert-parallel instance's own dispatch + combine all-to-all, on the FFN's path
        a2a = costs.colocated_a2a_ms_per_token * ffn_tok + costs.colocated_a2a_beta_ms
        ffn = ffn + np.where(ffn_tok > 0, a2a, 0.0)
        up = np.zeros_like(attn)
    elif shared:
        up = np.where(ffn_tok > 0, s.comm.alpha * ffn_tok + s.comm.beta, 0.0)  # [S, G]
    else:
        up = np.where(sends, s.comm.alpha * tok + s.comm.beta, 0.0)
    worker_on = sends.any(axis=2)  # [S, r]
    fixed = costs.step_beta_ms + (0.0 if colocated else costs.afd_step_ms)
    per_step = (
        costs.step_alpha_ms * load.sampled
        + costs.step_prefill_token_ms * load.prefill_tokens.sum(axis=2)
        + fixed
    )
    if not colocated and costs.afd_microbatch_ms:
        extra = np.maximum(sends.sum(axis=2) - 1, 0)  # [S, r] microbatches beyond the first
        per_step = per_step + costs.afd_microbatch_ms * extra
    post = np.where(worker_on, per_step, 0.0)
    return StageTimes(attn, up, up, ffn, post, sends, shared)


def step_timing(st: StageTimes, num_layers: int, pipeline: str) -> StepTiming:
    L = num_layers
    attention_busy = L * st.attention.sum(axis=2) + st.post  # [S, r]
    ffn_busy = L * st.ffn.sum(axis=1)  # [S]
    link_load = st.up.sum(axis=-1)
    link_busy = L * (link_load if st.shared_link else link_load.max(axis=1))
    if pipeline == "colocated":
        duration = L * (st.attention.sum(axis=2)[:, 0] + st.ffn.sum(axis=1)) + st.post[:, 0]
    elif pipeline == "ideal":
        a = st.attention.sum(axis=2)  # [S, r] (one group)
        c = st.up.sum(axis=-1)
        c = c if st.shared_link else c.max(axis=1)
        tau = np.maximum(np.maximum(a.max(axis=1), st.ffn.sum(axis=1)), c)
        duration = L * tau + st.post.max(axis=1)
    elif pipeline == "serial":
        links = st.up.sum(axis=-1) + st.down.sum(axis=-1)  # [S, r] or [S]
        links = links if st.shared_link else links.sum(axis=1)
        duration = L * (st.attention.sum(axis=(1, 2)) + st.ffn.sum(axis=1) + links)
        duration = duration + st.post.sum(axis=1)
    elif pipeline == "microbatch":
        duration = microbatch_makespan(st, L)
    else:
        raise ValueError(f"unknown pipeline {pipeline!r}")
    return StepTiming(duration, attention_busy, ffn_busy, link_busy)


def _scan(x0: np.ndarray, ready: np.ndarray, t: np.ndarray) -> np.ndarray:
    """x_i = max(x_{i-1}, ready_i) + t_i along the last axis, with x_{-1} = x0."""
    s = np.cumsum(t, axis=-1)
    z = np.maximum.accumulate(ready - (s - t), axis=-1)
    return s + np.maximum(x0[..., None], z)


def microbatch_makespan(st: StageTimes, num_layers: int) -> np.ndarray:
    """[S] exact step durations of the per-layer, per-microbatch pipeline (module docstring)."""
    a_all, sends_all = st.attention, st.sends
    S, r, G = a_all.shape
    out = np.zeros(S)
    if S == 0:
        return out
    L = num_layers
    shared = st.shared_link
    idx = np.arange(S)  # steps still being iterated
    a, sends, f, post = a_all, sends_all, st.ffn, st.post
    up, down = st.up, st.down
    worker_on = sends.any(axis=2)  # [S, r]
    mb_on = sends.any(axis=1)  # [S, G]
    link_shape = (S,) if shared else (S, r)
    a_free = np.zeros((S, r))
    u_free = np.zeros(link_shape)
    f_free = np.zeros(S)
    d_free = np.zeros(link_shape)
    d_in = np.zeros((S, r, G))
    prev: tuple[np.ndarray, ...] | None = None
    for layer in range(L):
        att = _scan(a_free, np.where(sends, d_in, _NEG), a)  # [S, r, G]
        a_free = att[..., -1]
        if shared:
            u = _scan(u_free, np.where(sends, att, _NEG).max(axis=1), up)  # [S, G]
            u_free = u[:, -1]
            ready = np.where(mb_on, u, _NEG)
        else:
            u = _scan(u_free, np.where(sends, att, _NEG), up)  # [S, r, G]
            u_free = u[..., -1]
            ready = np.where(sends, u, _NEG).max(axis=1)  # [S, G]
        ffn_done = _scan(f_free, ready, f)  # [S, G]
        f_free = ffn_done[:, -1]
        if shared:
            dn = _scan(d_free, np.where(mb_on, ffn_done, _NEG), down)  # [S, G]
            d_free = dn[:, -1]
            d_in = np.broadcast_to(dn[:, None, :], (len(idx), r, G))
            last = np.where(worker_on, _last_sent(dn[:, None, :], sends), 0.0)  # [S, r]
        else:
            d_in = _scan(d_free, np.where(sends, ffn_done[:, None, :], _NEG), down)  # [S, r, G]
            d_free = d_in[..., -1]
            last = np.where(worker_on, d_free, 0.0)
        state = (a_free, u_free, f_free, d_in)
        if layer == L - 1:
            out[idx] = (last + post).max(axis=1)
            break
        if prev is not None:
            periodic, lam = _uniform_shift(prev, state, worker_on, sends, shared)
            if periodic.any():
                remaining = L - 1 - layer
                fin = (np.where(worker_on, last + remaining * lam[:, None], 0.0) + post).max(axis=1)
                out[idx[periodic]] = fin[periodic]
                keep = ~periodic
                if not keep.any():
                    break
                idx = idx[keep]
                a, sends, f, post = a[keep], sends[keep], f[keep], post[keep]
                up, down = up[keep], down[keep]
                worker_on, mb_on = worker_on[keep], mb_on[keep]
                a_free, u_free, f_free = a_free[keep], u_free[keep], f_free[keep]
                d_free, d_in = d_free[keep], np.ascontiguousarray(d_in[keep])
                state = (a_free, u_free, f_free, d_in)
        prev = tuple(np.array(x, copy=True) for x in state)
    return out


def _last_sent(dn: np.ndarray, sends: np.ndarray) -> np.ndarray:
    """[S, r]: arrival time of each worker's last microbatch with tokens (shared-link case)."""
    times = np.where(sends, np.broadcast_to(dn, sends.shape), _NEG)
    return times.max(axis=2)


def _uniform_shift(
    prev: tuple[np.ndarray, ...],
    cur: tuple[np.ndarray, ...],
    worker_on: np.ndarray,
    sends: np.ndarray,
    shared: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Per step: did every relevant completion time move by the same amount? And by how much."""
    a0, u0, f0, d0 = prev
    a1, u1, f1, d1 = cur
    lam = f1 - f0  # [S]
    hi = lam.copy()
    lo = lam.copy()
    parts = [(a1 - a0, worker_on), (d1 - d0, sends)]
    if shared:
        hi = np.maximum(hi, u1 - u0)
        lo = np.minimum(lo, u1 - u0)
    else:
        parts.append((u1 - u0, worker_on))
    for delta, mask in parts:
        axes = tuple(range(1, delta.ndim))
        hi = np.maximum(hi, np.where(mask, delta, _NEG).max(axis=axes))
        lo = np.minimum(lo, np.where(mask, delta, np.inf).min(axis=axes))
    tol = _REL_TOL * (1.0 + np.abs(f1))
    return (hi - lo) <= tol, lam


# ---- one step in plain Python -----------------------------------------------------------------
# The engine often has to time a single step (an arrival is due): numpy's per-call overhead on
# arrays of a few elements then costs far more than the arithmetic. This is the same model as
# `stage_times` + `step_timing` on one step, in scalars (a test checks they agree).


def time_one_step(
    costs: SimCosts,
    pipeline: str,
    tokens: list[list[float]],
    context: list[list[float]],
    prefill_tokens: list[list[float]],
    pairs: list[list[float]],
    sampled: list[float],
) -> tuple[float, list[float], float, float]:
    """(duration, attention busy per worker, FFN busy, link busy) of one step, in ms."""
    s = costs.stages
    L = s.num_layers
    r, G = len(tokens), len(tokens[0])
    colocated = pipeline == "colocated"
    shared = s.comm_scales_with == "rB" and not colocated
    aa, ab = s.attention.alpha, s.attention.beta
    pt_ms, pp_ms = costs.prefill_token_ms, costs.prefill_pair_ms
    sends = [[t > 0 for t in row] for row in tokens]
    a = [
        [
            aa * context[k][i] + pt_ms * prefill_tokens[k][i] + pp_ms * pairs[k][i] + ab
            if sends[k][i]
            else 0.0
            for i in range(G)
        ]
        for k in range(r)
    ]
    ffn_tok = [sum(tokens[k][i] for k in range(r)) for i in range(G)]
    f = [s.ffn(n) if n > 0 else 0.0 for n in ffn_tok]
    if colocated:
        xa, xb = costs.colocated_a2a_ms_per_token, costs.colocated_a2a_beta_ms
        f = [fi + (xa * n + xb if n > 0 else 0.0) for fi, n in zip(f, ffn_tok, strict=True)]
    ca, cb = s.comm.alpha, s.comm.beta
    if colocated:
        up = [[0.0] * G for _ in range(r)]
        up_sh = [0.0] * G
    elif shared:
        up = [[0.0] * G for _ in range(r)]
        up_sh = [ca * n + cb if n > 0 else 0.0 for n in ffn_tok]
    else:
        up = [[ca * tokens[k][i] + cb if sends[k][i] else 0.0 for i in range(G)] for k in range(r)]
        up_sh = [0.0] * G
    fixed = costs.step_beta_ms + (0.0 if colocated else costs.afd_step_ms)
    on = [any(row) for row in sends]
    per_mb = 0.0 if colocated else costs.afd_microbatch_ms
    post = [
        costs.step_alpha_ms * sampled[k]
        + costs.step_prefill_token_ms * sum(prefill_tokens[k])
        + fixed
        + per_mb * max(sum(sends[k]) - 1, 0)
        if on[k]
        else 0.0
        for k in range(r)
    ]
    att_busy = [L * sum(a[k]) + post[k] for k in range(r)]
    ffn_busy = L * sum(f)
    link_busy = L * (sum(up_sh) if shared else max(sum(row) for row in up))
    if colocated:
        duration = L * (sum(a[0]) + sum(f)) + post[0]
    elif pipeline == "ideal":
        c = sum(up_sh) if shared else max(sum(row) for row in up)
        duration = L * max(max(sum(row) for row in a), sum(f), c) + max(post)
    elif pipeline == "serial":
        links = 2 * (sum(up_sh) if shared else sum(sum(row) for row in up))
        duration = L * (sum(sum(row) for row in a) + sum(f) + links) + sum(post)
    else:
        duration = _makespan_one(a, up, up_sh, f, post, sends, on, L, shared)
    return duration, att_busy, ffn_busy, link_busy


def _makespan_one(a, up, up_sh, f, post, sends, on, L: int, shared: bool) -> float:
    r, G = len(a), len(f)
    neg = -math.inf
    a_free = [0.0] * r
    u_free = [0.0] * r
    u_sh = 0.0
    f_free = 0.0
    d_free = [0.0] * r
    d_sh = 0.0
    d_in = [[0.0] * G for _ in range(r)]
    last = [0.0] * r
    prev: list[float] | None = None
    for layer in range(L):
        for i in range(G):
            ready = neg
            for k in range(r):
                if sends[k][i]:
                    a_free[k] = max(a_free[k], d_in[k][i]) + a[k][i]
                    if shared:
                        ready = max(ready, a_free[k])
                    else:
                        u_free[k] = max(u_free[k], a_free[k]) + up[k][i]
                        ready = max(ready, u_free[k])
            if ready == neg:
                continue
            if shared:
                u_sh = max(u_sh, ready) + up_sh[i]
                ready = u_sh
            f_free = max(f_free, ready) + f[i]
            if shared:
                d_sh = max(d_sh, f_free) + up_sh[i]
            for k in range(r):
                if sends[k][i]:
                    if shared:
                        d_in[k][i] = d_sh
                    else:
                        d_free[k] = max(d_free[k], f_free) + up[k][i]
                        d_in[k][i] = d_free[k]
                    last[k] = d_in[k][i]
        if layer == L - 1:
            break
        state = [f_free]
        for k in range(r):
            if on[k]:
                state.append(a_free[k])
                if not shared:
                    state.append(u_free[k])
                state.extend(d_in[k][i] for i in range(G) if sends[k][i])
        if shared:
            state.append(u_sh)
        if prev is not None:
            deltas = [x - y for x, y in zip(state, prev, strict=True)]
            lam = deltas[0]
            if max(deltas) - min(deltas) <= _REL_TOL * (1.0 + abs(f_free)):
                rest = (L - 1 - layer) * lam
                return max(last[k] + rest + post[k] if on[k] else 0.0 for k in range(r))
        prev = state
    return max(last[k] + post[k] if on[k] else 0.0 for k in range(r))


def decode_split_one(nd: list[int], ctx: list[int], groups: int) -> tuple[list, list]:
    """`decode_load` for one step, in lists: ([r][G] tokens, [r][G] context)."""
    tok, cx = [], []
    for n, c in zip(nd, ctx, strict=True):
        base, extra = divmod(n, groups)
        row = [float(base + (1 if i < extra else 0)) for i in range(groups)]
        tok.append(row)
        cx.append([c * t / n if n else 0.0 for t in row])
    return tok, cx
