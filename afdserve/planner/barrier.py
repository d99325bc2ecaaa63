"""Barrier-aware refinement: the r attention instances synchronise every step, so the slowest sets
the pace.

Each instance's attention time is mu + sigma * Z_j with mu = tA (mean field), sigma =
alpha_A * sqrt(B * sigma_X^2) (B slots with independent contexts), Z_j i.i.d. standard normal.
With G = max(tF(rB), tC),

    E[tau] = E[max(G, mu + sigma * max_j Z_j)] = G + sigma * integral_{z0}^{inf} (1 - Phi(x)^r) dx,
    z0 = (G - mu) / sigma,

because E[max(G, X)] = G + integral_G^inf P(X > t) dt. scipy is imported inside the functions so
that importing the planner stays cheap.
"""

from __future__ import annotations

import math

from afdserve.errors import UserInputError
from afdserve.planner.costs import StageCosts

_QUAD_OPTS = {"epsabs": 1e-11, "epsrel": 1e-10, "limit": 200}
_FAR_LEFT = -40.0  # Phi(-40) underflows to 0, so 1 - Phi^r is exactly 1 to the left of it


def _tail_integral(z0: float, r: int) -> float:
    """integral_{z0}^{inf} (1 - Phi(x)^r) dx, computed as -expm1(r * log Phi(x)) for accuracy."""
    from scipy.integrate import quad
    from scipy.special import log_ndtr

    def f(x: float) -> float:
        return -math.expm1(r * float(log_ndtr(x)))

    start = z0
    flat = 0.0
    if z0 < _FAR_LEFT:
        flat, start = _FAR_LEFT - z0, _FAR_LEFT
    mid = max(start, 0.0)
    body = quad(f, start, mid, **_QUAD_OPTS)[0] if mid > start else 0.0
    tail = quad(f, mid, math.inf, **_QUAD_OPTS)[0]
    return flat + body + tail


def expected_max_std_normal(r: int) -> float:
    """E[max of r i.i.d. standard normals] (0, 0.5642, 0.8463, 1.0294 for r = 1..4)."""
    from scipy.integrate import quad
    from scipy.special import ndtr

    _check_r(r)
    left = quad(lambda x: float(ndtr(x)) ** r, -math.inf, 0.0, **_QUAD_OPTS)[0]
    return _tail_integral(0.0, r) - left


def expected_max_with_floor(floor: float, mu: float, sigma: float, r: int) -> float:
    """E[max(floor, mu + sigma * max_{j<r} Z_j)] for i.i.d. standard normal Z_j."""
    _check_r(r)
    if sigma < 0 or not math.isfinite(sigma):
        raise UserInputError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if sigma == 0:
        return max(floor, mu)
    z0 = (floor - mu) / sigma
    return floor + sigma * _tail_integral(z0, r)


def attention_sigma(costs: StageCosts, batch: int, sigma2: float) -> float:
    """Standard deviation of one instance's attention time: alpha_A * sqrt(B * sigma_X^2)."""
    return costs.attention.alpha * math.sqrt(batch * sigma2)


def expected_cycle_time(
    costs: StageCosts, batch: int, theta: float, sigma2: float, r: int
) -> float:
    """E[tau] (ms, per layer) of an rA-1F bundle with the attention barrier."""
    mu = costs.t_attention(batch * theta)
    floor = max(costs.t_ffn(r * batch), costs.t_comm_for(batch, r))
    return expected_max_with_floor(floor, mu, attention_sigma(costs, batch, sigma2), r)


def _check_r(r: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserInputError(f"r must be an integer >= 1, got {r!r}")
