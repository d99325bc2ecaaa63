"""Metrics of simulated runs: throughput (total, per instance, per device), idle fractions,
TTFT / TPOT / ITL distributions and goodput under SLOs.

`summarize` takes the runs of every unit of one deployment (they run side by side on one time
axis), so a deployment of N aggregated instances or of prefill and decode pools is summarised
like a single bundle. Definitions:

- throughput: output tokens of the measured steps / the time from the first measured step's
  start to the last step's end (over all units); per instance and per device divide by the
  deployment's instance and device counts;
- idle: 1 - busy / (workers x span), attention and FFN apart (a colocated instance reports its
  whole busy time as `attention_idle` and no FFN figure);
- TTFT = first token - arrival; TPOT = (last token - first token) / (output - 1) for outputs of
  two tokens or more; ITL = the gaps between consecutive tokens of a request (in the simulator,
  the durations of the steps that produced them, weighted by how many they produced);
- a request meets the SLOs when TTFT <= ttft_slo and TPOT <= tpot_slo (a one-token request has
  no TPOT); goodput = output tokens of the requests that meet them / span; attainment = their
  share of the finished requests;
- requests already running at time 0 (stationary start) give no latency samples, and requests
  not finished when a run stops are counted apart (`unfinished`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from afdserve.errors import UserInputError
from afdserve.sim.run import SimRun


@dataclass(frozen=True)
class LatencyStats:
    """Distribution summary in ms (nan when there are no samples)."""

    mean: float
    median: float
    p90: float
    p99: float
    count: int

    @staticmethod
    def of(values: np.ndarray, weights: np.ndarray | None = None) -> LatencyStats:
        v = np.asarray(values, dtype=np.float64)
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        if w is not None:
            keep = w > 0
            v, w = v[keep], w[keep]
        if v.size == 0:
            nan = math.nan
            return LatencyStats(nan, nan, nan, nan, 0)
        q = weighted_quantiles(v, w, (0.5, 0.9, 0.99))
        mean = float(np.average(v, weights=w))
        count = int(v.size if w is None else round(float(w.sum())))
        return LatencyStats(mean, q[0], q[1], q[2], count)

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


def weighted_quantiles(
    values: np.ndarray, weights: np.ndarray | None, qs: Sequence[float]
) -> list[float]:
    """Inverted-CDF quantiles: the smallest value whose cumulative weight reaches q."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    w = np.ones_like(v) if weights is None else weights[order]
    cw = np.cumsum(w)
    total = cw[-1]
    out = []
    for q in qs:
        i = int(np.searchsorted(cw, q * total - 1e-12 * total, side="left"))
        out.append(float(v[min(i, v.size - 1)]))
    return out


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UserInputError(f"{name} SLO must be a number > 0 ms, got {v!r}")


@dataclass(frozen=True)
class SimReport:
    label: str
    units: int
    instances: int
    devices: float
    steps: int
    requests_finished: int
    unfinished: int
    output_tokens: int
    span_s: float
    throughput_tok_s: float
    throughput_per_instance: float
    throughput_per_device: float
    attention_idle: float
    ffn_idle: float | None
    mean_step_ms: float
    mean_context_per_slot: float | None
    mean_decode_slots: float
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    tokens_per_user_s: float
    """1000 / mean TPOT: what one user sees, tokens/s."""
    slo: SLO | None
    slo_attainment: float | None
    goodput_tok_s: float | None
    wall_s: float
    speed: float
    """Simulated seconds per wall-clock second."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k in self.__dataclass_fields__:
            v = getattr(self, k)
            if isinstance(v, LatencyStats):
                d[k] = v.to_dict()
            elif isinstance(v, SLO):
                d[k] = asdict(v)
            elif isinstance(v, float) and not math.isfinite(v):
                d[k] = None
            else:
                d[k] = v
        return d


def summarize(
    runs: Sequence[SimRun],
    *,
    label: str = "",
    devices: float | None = None,
    slo: SLO | None = None,
    warmup_steps: int = 0,
    wall_s: float | None = None,
) -> SimReport:
    """One report for the runs of all units of a deployment (see the module docstring)."""
    if not runs:
        raise ValueError("summarize needs at least one run")
    instances = sum(r.config.instances for r in runs)
    devices = float(instances if devices is None else devices)
    starts, ends = [], []
    tokens = steps = 0
    att_busy = att_cap = ffn_busy = ffn_cap = 0.0
    dec_ctx = dec_slots = 0.0
    dur_sum = 0.0
    colocated = all(not r.config.is_afd for r in runs)
    itl_v, itl_w = [], []
    for run in runs:
        w = min(warmup_steps, run.num_steps)
        if run.num_steps - w <= 0:
            continue
        st, du = run.step_start[w:], run.step_duration[w:]
        starts.append(float(st[0]))
        ends.append(float(st[-1] + du[-1]))
        tokens += int(run.tokens_out[w:].sum())
        steps += int(du.size)
        dur_sum += float(du.sum())
        a_busy = float(run.attention_busy[w:].sum())
        if colocated:
            a_busy += float(run.ffn_busy[w:].sum())
        att_busy += a_busy
        ffn_busy += float(run.ffn_busy[w:].sum())
        dec_ctx += float(run.decode_context[w:].sum())
        dec_slots += float(run.decode_slots[w:].sum())
        itl_v.append(du)
        itl_w.append(run.itl_tokens[w:])
        if run.extra_itl is not None:
            itl_v.append(run.extra_itl[0])
            itl_w.append(run.extra_itl[1])
    span_ms = (max(ends) - min(starts)) if starts else 0.0
    for run in runs:
        w = min(warmup_steps, run.num_steps)
        if run.num_steps - w > 0:
            att_cap += run.config.attention_workers * span_ms
            if run.config.is_afd:
                ffn_cap += span_ms
    thr = tokens / (span_ms / 1e3) if span_ms > 0 else 0.0

    arrival = np.concatenate([r.arrival for r in runs])
    first = np.concatenate([r.first_token for r in runs])
    finish = np.concatenate([r.finish for r in runs])
    out_len = np.concatenate([r.output_len for r in runs])
    warm = np.concatenate([r.warm for r in runs])
    done = ~warm & np.isfinite(finish) & np.isfinite(first)
    unfinished = int(np.count_nonzero(~warm & ~np.isfinite(finish)))
    ttft = first[done] - arrival[done]
    multi = done & (out_len > 1)
    tpot = (finish[multi] - first[multi]) / (out_len[multi] - 1)
    tpot_stats = LatencyStats.of(tpot)
    itl = (
        LatencyStats.of(np.concatenate(itl_v), np.concatenate(itl_w))
        if itl_v
        else LatencyStats.of(np.zeros(0))
    )

    attain = goodput = None
    if slo is not None and (slo.ttft_ms is not None or slo.tpot_ms is not None):
        ok = np.ones(int(done.sum()), dtype=bool)
        if slo.ttft_ms is not None:
            ok &= ttft <= slo.ttft_ms
        if slo.tpot_ms is not None:
            tp = np.full(ok.shape, 0.0)
            tp[(out_len[done] > 1)] = tpot
            ok &= tp <= slo.tpot_ms
        attain = float(ok.mean()) if ok.size else 0.0
        good_tokens = float(out_len[done][ok].sum())
        goodput = good_tokens / (span_ms / 1e3) if span_ms > 0 else 0.0
    wall = float(wall_s if wall_s is not None else sum(r.wall_s for r in runs))
    sim_s = max((r.sim_time_ms for r in runs), default=0.0) / 1e3
    return SimReport(
        label=label,
        units=len(runs),
        instances=instances,
        devices=devices,
        steps=steps,
        requests_finished=int(done.sum()),
        unfinished=unfinished,
        output_tokens=tokens,
        span_s=span_ms / 1e3,
        throughput_tok_s=thr,
        throughput_per_instance=thr / instances,
        throughput_per_device=thr / devices,
        attention_idle=1.0 - att_busy / att_cap if att_cap > 0 else math.nan,
        ffn_idle=(1.0 - ffn_busy / ffn_cap) if (ffn_cap > 0 and not colocated) else None,
        mean_step_ms=dur_sum / steps if steps else math.nan,
        mean_context_per_slot=dec_ctx / dec_slots if dec_slots > 0 else None,
        mean_decode_slots=dec_slots / steps if steps else 0.0,
        ttft_ms=LatencyStats.of(ttft),
        tpot_ms=tpot_stats,
        itl_ms=itl,
        tokens_per_user_s=1e3 / tpot_stats.mean
        if tpot_stats.count and tpot_stats.mean > 0
        else math.nan,
        slo=slo,
        slo_attainment=attain,
        goodput_tok_s=goodput,
        wall_s=wall,
        speed=sim_s / wall if wall > 0 else math.inf,
    )
