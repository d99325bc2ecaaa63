"""Mean-field cycle time, objective and the closed-form optimal Attention/FFN ratio.

An rA-1F bundle: r attention instances with B slots each share one FFN instance. Per layer, with
mean-field context T = B * theta per attention instance,

    tA = alpha_A * B * theta + beta_A,   tC = alpha_C * B + beta_C,   tF(r) = alpha_F * r * B + beta_F
    tau(r) = max(tA, tC, tF(r))                 (pipelined: the slowest stage sets the pace)
    objective(r) = r * B / ((r * c_A + c_F) * L * tau(r))     tokens/ms per unit of cost

With instance weights c_A = c_F = 1 this is the throughput per instance r*B / ((r+1) * L * tau).
While tau is flat (attention or communication bound) the objective grows with r; once the FFN
dominates it is r / ((c_A r + c_F)(a r + b)) with a = alpha_F*B, b = beta_F, which peaks at
r_peak = sqrt(c_F * b / (c_A * a)). Hence

    r_A = (tA - beta_F) / (alpha_F B),  r_C = (tC - beta_F) / (alpha_F B),  r* = max(r_A, r_C, r_peak)

and, the objective being unimodal in r, the best integer is floor(r*) or ceil(r*) (at least 1).
When communication scales with r*B (the FFN's link is the bottleneck), or with both (each
side's link priced on its own, tC = max(alpha_C B + beta_C, alpha_CF r B + beta_CF)), tC grows
with r as well and r* is found by `continuous_optimum`, which maximises over the breakpoints of tau and each
segment's stationary point (and reduces to the formula above in the B case).

A roofline FFN, tF(r) = max(alpha_F r B, beta_F) (`Affine.combine == "max"`), is a line through
the origin above a flat floor beta_F: the floor joins the flat part of tau, the line has b = 0,
so r_peak = 0 and r* = max(r_A, r_C, beta_F / (alpha_F B)), the ratio where the FFN's compute
catches the slowest of attention, communication and its own weight streaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from afdserve.errors import UserInputError
from afdserve.planner.costs import StageCosts


@dataclass(frozen=True)
class CostWeights:
    """Prices of one attention and one FFN instance, for the throughput-per-cost objective."""

    attention: float = 1.0
    ffn: float = 1.0
    unit: str = "instance"
    """What a unit of weight is: 'instance' (equal weights), 'device', or a currency like '$/h'."""

    def __post_init__(self) -> None:
        for name in ("attention", "ffn"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UserInputError(f"{name} price/weight must be a number > 0, got {v!r}")


@dataclass(frozen=True)
class StageTimes:
    """Per-layer stage loads (ms) of one rA-1F cycle: what each server does in one layer."""

    attention: float
    ffn: float
    comm: float
    round_trip: float = 0.0
    """With M microbatches: one microbatch's A -> F -> A lap (t_A + t_C + t_F + t_C); a layer
    cannot take less, since a microbatch's next layer waits for its last one. 0 in the ideal
    model (no microbatches given)."""

    @property
    def cycle(self) -> float:
        return max(self.attention, self.ffn, self.comm, self.round_trip)


@dataclass(frozen=True)
class ClosedForm:
    r_a: float
    r_c: float
    r_peak: float
    r_star: float


def check_inputs(costs: StageCosts, batch: int, theta: float) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserInputError(f"batch must be an integer >= 1, got {batch!r}")
    if not (math.isfinite(theta) and theta >= 0):
        raise UserInputError(f"theta must be a finite number >= 0, got {theta!r}")
    if costs.ffn.alpha <= 0:
        raise UserInputError("alpha_F must be > 0: the FFN time has to grow with its batch")


def stage_times(
    costs: StageCosts, batch: int, theta: float, r: float, microbatches: int | None = None
) -> StageTimes:
    """Per-layer loads. `microbatches=None`: the ideal model of the closed form (perfect overlap,
    each fixed cost paid once a layer). `microbatches=M`: the steady state of the exact ping-pong
    pipeline the simulator times, M microbatches of B/M slots each paying every fixed cost,
    with the cycle max(M t_A, M t_F, M t_C, t_A + 2 t_C + t_F) of per-microbatch times (a ring of
    four servers with M identical jobs in flight; M = 1 is the unpipelined sum)."""
    if microbatches is None:
        return StageTimes(
            attention=costs.t_attention(batch * theta),
            ffn=costs.t_ffn(r * batch),
            comm=costs.t_comm_for(batch, r),
        )
    m = microbatches
    slots = batch / m
    a = costs.t_attention(slots * theta)
    f = costs.t_ffn(r * slots)
    c = costs.t_comm_for(slots, r)
    return StageTimes(attention=m * a, ffn=m * f, comm=m * c, round_trip=a + f + 2 * c)


def objective(
    r: float, batch: int, cycle_ms: float, num_layers: int, weights: CostWeights
) -> float:
    """Tokens per ms per unit cost: r*B / ((r*c_A + c_F) * L * tau)."""
    return r * batch / ((r * weights.attention + weights.ffn) * num_layers * cycle_ms)


def throughput_per_instance(r: float, batch: int, cycle_ms: float, num_layers: int) -> float:
    """Tokens per ms per instance: r*B / ((r+1) * L * tau)."""
    return objective(r, batch, cycle_ms, num_layers, CostWeights())


def r_peak(costs: StageCosts, batch: int, weights: CostWeights = CostWeights()) -> float:
    """Where r*B / ((c_A r + c_F)(alpha_F r B + beta_F)) peaks: sqrt(c_F beta_F / (c_A alpha_F B));
    0 for a roofline FFN (its line has no intercept: the objective falls once compute binds)."""
    slope, intercept, _ = costs.ffn.line
    return math.sqrt(weights.ffn * intercept / (weights.attention * slope * batch))


def closed_form(
    costs: StageCosts, batch: int, theta: float, weights: CostWeights = CostWeights()
) -> ClosedForm:
    """r_A, r_C, r_peak and the continuous optimum r* (mean field)."""
    check_inputs(costs, batch, theta)
    slope, intercept, floor = costs.ffn.line
    a = slope * batch
    t_a = costs.t_attention(batch * theta)
    r_a = (t_a - intercept) / a
    peak = r_peak(costs, batch, weights)
    if costs.comm_scales_with == "B":
        t_c = costs.t_comm(batch)
        r_c = (t_c - intercept) / a
        r_star = max(r_a, r_c, (floor - intercept) / a, peak)
    else:
        # the FFN's link grows with r: r_C is where it catches up with attention
        link = costs.comm_ffn if costs.comm_scales_with == "both" else costs.comm
        assert link is not None
        a_c = link.alpha * batch
        r_c = (t_a - link.beta - link.fixed) / a_c if a_c > 0 else -math.inf
        r_star = continuous_optimum(costs, batch, theta, weights)
    return ClosedForm(r_a=r_a, r_c=r_c, r_peak=peak, r_star=r_star)


def continuous_optimum(
    costs: StageCosts, batch: int, theta: float, weights: CostWeights = CostWeights()
) -> float:
    """argmax over real r > 0 of the objective, with tau = max of a constant and affine lines.

    tau is piecewise affine and convex in r; on a piece where tau is constant the objective
    rises, on a piece a*r + b it is unimodal with its peak at sqrt(c_F b / (c_A a)). So the
    optimum is a breakpoint or such a peak clipped to its piece: evaluate them all.
    """
    check_inputs(costs, batch, theta)
    slope, intercept, floor = costs.ffn.line
    flat = max(costs.t_attention(batch * theta), floor)
    lines = [(slope * batch, intercept)]
    if costs.comm_scales_with == "rB":
        lines.append((costs.comm.alpha * batch, costs.comm.beta + costs.comm.fixed))
    else:
        flat = max(flat, costs.t_comm(batch))
    if costs.comm_ffn is not None:  # 'both': the attention link is flat in r, the FFN's a line
        lines.append((costs.comm_ffn.alpha * batch, costs.comm_ffn.beta + costs.comm_ffn.fixed))

    def tau(r: float) -> float:
        return max(flat, *(a * r + b for a, b in lines))

    candidates = {1e-9}
    for a, b in lines:
        if a > 0:
            candidates.add((flat - b) / a)
            candidates.add(math.sqrt(weights.ffn * b / (weights.attention * a)))
    for i, (a1, b1) in enumerate(lines):
        for a2, b2 in lines[i + 1 :]:
            if a1 != a2:
                candidates.add((b2 - b1) / (a1 - a2))
    candidates = {c for c in candidates if c > 0 and math.isfinite(c)}
    return max(candidates, key=lambda r: objective(r, batch, tau(r), 1, weights))


def best_integer(r_star: float, score: Callable[[int], float]) -> int:
    """Whichever of floor(r*) and ceil(r*) (each at least 1) scores higher; ties go to the smaller."""
    lo = max(1, math.floor(r_star))
    hi = max(1, math.ceil(r_star))
    return hi if score(hi) > score(lo) else lo
