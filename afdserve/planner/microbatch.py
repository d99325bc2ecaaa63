"""How many ping-pong microbatches hide the A<->F communication (MegaScale-Infer, arXiv 2504.02263).

With per-microbatch compute T_f = max(T_a, T_e) and one-way communication T_c, ping-pong keeps
both sides busy when m >= 2 * (1 + T_c / T_f): two microbatches cover compute on both sides,
and each T_c/T_f of transfer needs two more in flight. The planner reports the smallest such m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from afdserve.errors import UserInputError
from afdserve.planner.costs import StageCosts

_EPS = 1e-9  # so that 2 * (1 + 0.5) = 3.0000000000000004 still gives 3


def min_microbatches(tc_over_tf: float) -> int:
    """The smallest integer m >= 2 * (1 + T_c / T_f)."""
    if not (math.isfinite(tc_over_tf) and tc_over_tf >= 0):
        raise UserInputError(f"T_c / T_f must be a finite number >= 0, got {tc_over_tf!r}")
    return math.ceil(2.0 * (1.0 + tc_over_tf) - _EPS)


@dataclass(frozen=True)
class MicrobatchPlan:
    microbatches: int
    """Smallest m that satisfies the rule with per-microbatch times at B/m slots."""
    t_attention: float
    t_ffn: float
    t_comm: float
    """Per-microbatch, per-layer stage times (ms) at that m."""

    @property
    def tc_over_tf(self) -> float:
        return self.t_comm / max(self.t_attention, self.t_ffn)


def plan_microbatches(costs: StageCosts, batch: int, theta: float, r: int) -> MicrobatchPlan | None:
    """Smallest m in 1..B with m >= 2(1 + T_c/T_f), each microbatch holding B/m slots of every
    attention instance (the FFN sees r*B/m tokens); None if no m <= B hides the transfers."""
    for m in range(1, batch + 1):
        slots = batch / m
        t_a = costs.t_attention(slots * theta)
        t_e = costs.t_ffn(r * slots)
        t_c = costs.t_comm_for(slots, r)
        t_f = max(t_a, t_e)
        if t_f > 0 and m >= min_microbatches(t_c / t_f):
            return MicrobatchPlan(m, t_a, t_e, t_c)
    return None
