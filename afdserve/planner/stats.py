"""Workload statistics: the step-weighted context per decode slot (theta) and its variance.

With continuous batching every slot is always full. A request with prompt length P and D decode
steps holds P + j context tokens at its j-th step (j = 0..D-1), and it occupies its slot for D
steps, so long requests weigh in proportion to their length. By renewal-reward, the long-run
context of one slot is

    theta     = E[D*P + D*(D-1)/2] / E[D]                       (not the naive E[P + D/2])
    sigma_X^2 = E[sum_j (P+j)^2] / E[D] - theta^2,
    sum_j (P+j)^2 = D*P^2 + P*D*(D-1) + (D-1)*D*(2D-1)/6.

From a trace, expectations are sample means (ratios of sums). From distributions, P and D are
taken as independent and the expectations are expressed through raw moments.

Convention: every output token counts as one decode step, so D is the trace's output length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from afdserve.errors import UserInputError
from afdserve.planner.distributions import LengthDistribution
from afdserve.planner.workload import Trace


@dataclass(frozen=True)
class WorkloadStats:
    """What the ratio planner needs to know about a workload."""

    theta: float
    """Step-weighted mean context tokens per decode slot."""
    sigma2: float | None = None
    """Per-slot variance of the context (tokens^2); None when unknown (no barrier refinement)."""
    source: str = "explicit"
    """Where the numbers came from: a trace name, a distribution pair, or 'explicit'."""
    num_requests: int | None = None
    mean_prompt: float | None = None
    mean_output: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.theta) and self.theta >= 0):
            raise UserInputError(f"theta must be a finite number >= 0, got {self.theta!r}")
        if self.sigma2 is not None and not (math.isfinite(self.sigma2) and self.sigma2 >= 0):
            raise UserInputError(f"sigma2 must be a finite number >= 0, got {self.sigma2!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stats_from_lengths(
    prompt_len: np.ndarray, output_len: np.ndarray, source: str = "lengths"
) -> WorkloadStats:
    """theta and sigma_X^2 from per-request prompt lengths P_i and decode-step counts D_i."""
    p = np.asarray(prompt_len, dtype=np.float64)  # [N]
    d = np.asarray(output_len, dtype=np.float64)  # [N]
    if p.shape != d.shape or p.ndim != 1 or p.size == 0:
        raise UserInputError("need equally long, non-empty 1-D prompt and output lengths")
    total_steps = d.sum()
    if total_steps <= 0:
        raise UserInputError(f"workload {source!r}: no request has any output token")
    context_sum = d * p + d * (d - 1) / 2.0  # [N] sum_j (P+j)
    square_sum = d * p * p + p * d * (d - 1) + (d - 1) * d * (2 * d - 1) / 6.0  # [N] sum_j (P+j)^2
    theta = float(context_sum.sum() / total_steps)
    sigma2 = float(square_sum.sum() / total_steps - theta * theta)
    return WorkloadStats(
        theta=theta,
        sigma2=max(sigma2, 0.0),
        source=source,
        num_requests=int(p.size),
        mean_prompt=float(p.mean()),
        mean_output=float(d.mean()),
    )


def stats_from_trace(trace: Trace) -> WorkloadStats:
    return stats_from_lengths(trace.prompt_len, trace.output_len, source=trace.name)


def stats_from_moments(
    prompt_moments: tuple[float, float, float],
    output_moments: tuple[float, float, float],
    source: str = "moments",
) -> WorkloadStats:
    """theta and sigma_X^2 for independent P and D given (E[X], E[X^2], E[X^3]) of each."""
    ep, ep2, _ = prompt_moments
    ed, ed2, ed3 = output_moments
    if ed <= 0:
        raise UserInputError(f"workload {source!r}: the mean output length must be > 0")
    theta = ep + (ed2 - ed) / (2.0 * ed)
    square = ed * ep2 + ep * (ed2 - ed) + (2.0 * ed3 - 3.0 * ed2 + ed) / 6.0
    sigma2 = square / ed - theta * theta
    return WorkloadStats(
        theta=float(theta),
        sigma2=float(max(sigma2, 0.0)),
        source=source,
        mean_prompt=float(ep),
        mean_output=float(ed),
    )


def stats_from_distributions(
    prompt: LengthDistribution, output: LengthDistribution
) -> WorkloadStats:
    """Statistics of independent prompt and output length distributions."""
    return stats_from_moments(
        prompt.moments(),
        output.moments(),
        source=f"prompt {prompt.describe()}, output {output.describe()}",
    )
