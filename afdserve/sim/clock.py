"""Deferred step timing: the simulator's clock.

A step's load (what every worker and microbatch computes) does not depend on time; only the
admission of arriving requests does. So the engine hands each step's load to the clock and the
clock times steps in batches (vectorised, `afdserve.sim.pipeline`) when it has to: when an
admission depends on whether a request has arrived yet, before jumping over idle time, every
`flush_every` steps, and at the end.

Decode-only steps are recorded as per-worker sums (decoding slots, context) and split into
microbatches at flush time, vectorised; steps with prefill chunks carry explicit per-(worker,
microbatch) loads.
"""

from __future__ import annotations

import numpy as np

from afdserve.sim.costs import SimCosts
from afdserve.sim.pipeline import (
    StageTimes,
    StepLoad,
    decode_load,
    decode_split_one,
    stage_times,
    step_timing,
    time_one_step,
)

SCALAR_STEPS = 2
"""Flushes of at most this many steps are timed in plain Python (cheaper than numpy there)."""


class StepClock:
    def __init__(
        self, costs: SimCosts, pipeline: str, groups: int, flush_every: int = 4096
    ) -> None:
        self.costs = costs
        self.pipeline = pipeline
        self.groups = groups
        self.flush_every = flush_every
        self.now_ms = 0.0
        """End of the last timed step (or the time jumped to)."""
        self._nd: list[np.ndarray] = []  # blocks [s, r]
        self._ctx: list[np.ndarray] = []
        self._pending = 0
        self._explicit: dict[int, tuple[np.ndarray, ...]] = {}
        self.start: list[np.ndarray] = []
        self.duration: list[np.ndarray] = []
        self.attention_busy: list[np.ndarray] = []
        self.ffn_busy: list[np.ndarray] = []
        self.link_busy: list[np.ndarray] = []
        self.kept_stages: list[StageTimes] = []
        self.keep_steps = 0
        """Keep the stage times of this many first steps (for timeline plots)."""

    @property
    def pending(self) -> int:
        return self._pending

    def push_decode(self, decoding: np.ndarray, context: np.ndarray) -> None:
        """Record a decode-only step from per-worker sums ([r] each; copies are kept)."""
        self._nd.append(decoding[None, :].copy())
        self._ctx.append(context[None, :].copy())
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def push_many(self, decoding: np.ndarray, context: np.ndarray) -> None:
        """Record a block of decode-only steps ([s, r] each)."""
        self._nd.append(np.asarray(decoding))
        self._ctx.append(np.asarray(context))
        self._pending += int(decoding.shape[0])
        if self._pending >= self.flush_every:
            self.flush()

    def push_explicit(
        self, decoding: np.ndarray, context: np.ndarray, loads: tuple[np.ndarray, ...]
    ) -> None:
        """Record a step with explicit per-(worker, microbatch) loads (tokens [r,G], context
        [r,G], prefill tokens [r,G], pairs [r,G], sampled [r])."""
        self._explicit[self._pending] = loads
        self.push_decode(decoding, context)

    def _load(self, start: int) -> StepLoad:
        nd = np.concatenate(self._nd)[start:]
        ctx = np.concatenate(self._ctx)[start:]
        load = decode_load(nd, ctx, self.groups)
        for i, loads in self._explicit.items():
            if i >= start:
                j = i - start
                load.tokens[j], load.context[j], load.prefill_tokens[j] = loads[:3]
                load.prefill_pairs[j], load.sampled[j] = loads[3], loads[4]
        return load

    def flush(self) -> None:
        """Time every pending step exactly."""
        if not self._pending:
            return
        if self._pending <= SCALAR_STEPS and not self.keep_steps:
            self._flush_scalar()
            return
        st = stage_times(self.costs, self._load(0), self.pipeline)
        timing = step_timing(st, self.costs.num_layers, self.pipeline)
        d = timing.duration
        self.start.append(self.now_ms + np.concatenate(([0.0], np.cumsum(d)[:-1])))
        self.duration.append(d)
        self.attention_busy.append(timing.attention_busy)
        self.ffn_busy.append(timing.ffn_busy)
        self.link_busy.append(timing.link_busy)
        if self.keep_steps > 0:
            k = min(self.keep_steps, len(d))
            self.kept_stages.append(_slice_stages(st, k))
            self.keep_steps -= k
        self.now_ms += float(d.sum())
        self._nd.clear()
        self._ctx.clear()
        self._explicit.clear()
        self._pending = 0

    def _flush_scalar(self) -> None:
        """The same as `flush` for a step or two, in plain Python (`pipeline.time_one_step`)."""
        nd_all = np.concatenate(self._nd).tolist()
        ctx_all = np.concatenate(self._ctx).tolist()
        starts, durs, att, ffn, link = [], [], [], [], []
        t = self.now_ms
        for j, (nd, ctx) in enumerate(zip(nd_all, ctx_all, strict=True)):
            loads = self._explicit.get(j)
            if loads is None:
                tok, cx = decode_split_one(nd, ctx, self.groups)
                zeros = [[0.0] * self.groups for _ in nd]
                row = (tok, cx, zeros, zeros, [float(x) for x in nd])
            else:
                row = tuple(x.tolist() for x in loads)
            d, a_busy, f_busy, l_busy = time_one_step(self.costs, self.pipeline, *row)
            starts.append(t)
            durs.append(d)
            att.append(a_busy)
            ffn.append(f_busy)
            link.append(l_busy)
            t += d
        self.start.append(np.asarray(starts))
        self.duration.append(np.asarray(durs))
        self.attention_busy.append(np.asarray(att))
        self.ffn_busy.append(np.asarray(ffn))
        self.link_busy.append(np.asarray(link))
        self.now_ms = t
        self._nd.clear()
        self._ctx.clear()
        self._explicit.clear()
        self._pending = 0

    def jump_to(self, t_ms: float) -> None:
        """Idle until t_ms (only with no pending steps)."""
        if self._pending:
            raise RuntimeError("jump_to with untimed steps pending")
        self.now_ms = max(self.now_ms, t_ms)

    def arrays(self, num_workers: int) -> dict[str, np.ndarray]:
        self.flush()
        if not self.duration:
            empty = np.zeros(0)
            return {
                "start": empty,
                "duration": empty,
                "attention_busy": np.zeros((0, num_workers)),
                "ffn_busy": empty,
                "link_busy": empty,
            }
        return {
            "start": np.concatenate(self.start),
            "duration": np.concatenate(self.duration),
            "attention_busy": np.concatenate(self.attention_busy),
            "ffn_busy": np.concatenate(self.ffn_busy),
            "link_busy": np.concatenate(self.link_busy),
        }


def _slice_stages(st: StageTimes, k: int) -> StageTimes:
    return StageTimes(
        st.attention[:k].copy(),
        st.up[:k].copy(),
        st.down[:k].copy(),
        st.ffn[:k].copy(),
        st.post[:k].copy(),
        st.sends[:k].copy(),
        st.shared_link,
    )
