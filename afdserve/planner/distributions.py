"""Length distributions for synthetic workloads: fixed, uniform, geometric, lognormal, empirical.

The planner needs only the first three raw moments of the prompt length P and the decode-step
count D (see `stats.stats_from_distributions`); the simulator and load generator may also draw
samples. Every distribution is over whole token counts, and its moments are exact for the
distribution it samples from (the lognormal is discretised by rounding, and its moments are
computed from that discretised pmf, so a large sample's statistics converge to them).

Spec strings (CLI `--prompt` / `--output`):
`fixed:N`, `uniform:LOW:HIGH` (inclusive), `geometric:P` (support 1, 2, ...; mean 1/P),
`lognormal:MU:SIGMA` (of the natural log of the length; rounded, at least 1),
`empirical:V1,V2,...` or `empirical:FILE` (whitespace- or comma-separated integers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afdserve.errors import UserInputError

Moments = tuple[float, float, float]
"""(E[X], E[X^2], E[X^3])."""

_LOGNORMAL_TAIL = 1e-12
_LOGNORMAL_MAX_SUPPORT = 20_000_000


@dataclass(frozen=True)
class Fixed:
    """Every request has the same length."""

    value: int

    def __post_init__(self) -> None:
        _check_int(self.value, "fixed length", minimum=0)

    def moments(self) -> Moments:
        v = float(self.value)
        return v, v * v, v**3

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)  # [n]

    def describe(self) -> str:
        return f"fixed:{self.value}"


@dataclass(frozen=True)
class Uniform:
    """Whole numbers low..high inclusive, equally likely."""

    low: int
    high: int

    def __post_init__(self) -> None:
        _check_int(self.low, "uniform low", minimum=0)
        _check_int(self.high, "uniform high", minimum=0)
        if self.high < self.low:
            raise UserInputError(f"uniform: high ({self.high}) must be >= low ({self.low})")

    def moments(self) -> Moments:
        k = np.arange(self.low, self.high + 1, dtype=np.float64)
        return _pmf_moments(k, np.full(k.size, 1.0 / k.size))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)

    def describe(self) -> str:
        return f"uniform:{self.low}:{self.high}"


@dataclass(frozen=True)
class Geometric:
    """Number of trials to the first success with success probability p: support 1, 2, ...

    The natural model of "stop with probability p after each token" (an EOS hazard), mean 1/p.
    """

    p: float

    def __post_init__(self) -> None:
        if not (isinstance(self.p, (int, float)) and 0.0 < self.p <= 1.0):
            raise UserInputError(f"geometric: p must be in (0, 1], got {self.p!r}")

    def moments(self) -> Moments:
        p = float(self.p)
        return 1.0 / p, (2.0 - p) / p**2, (p * p - 6.0 * p + 6.0) / p**3

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.geometric(self.p, size=n).astype(np.int64)

    def describe(self) -> str:
        return f"geometric:{self.p:g}"


@dataclass(frozen=True)
class Lognormal:
    """max(1, round(exp(N(mu, sigma^2)))): heavy-tailed lengths, as in most production traces."""

    mu: float
    sigma: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and math.isfinite(self.sigma) and self.sigma > 0):
            raise UserInputError(
                f"lognormal: need finite mu and sigma > 0, got mu={self.mu!r} sigma={self.sigma!r}"
            )
        if self._support_max() > _LOGNORMAL_MAX_SUPPORT:
            raise UserInputError(
                f"lognormal:{self.mu:g}:{self.sigma:g} has a tail beyond "
                f"{_LOGNORMAL_MAX_SUPPORT} tokens; choose a smaller mu or sigma"
            )

    def _support_max(self) -> int:
        from scipy.stats import norm

        z = float(norm.isf(_LOGNORMAL_TAIL))
        return int(math.ceil(math.exp(self.mu + z * self.sigma))) + 1

    def moments(self) -> Moments:
        from scipy.stats import norm

        k = np.arange(1, self._support_max() + 1, dtype=np.float64)  # [K]
        upper = norm.cdf((np.log(k + 0.5) - self.mu) / self.sigma)  # P(X < k + 1/2)
        lower = np.concatenate(([0.0], upper[:-1]))  # everything below 1.5 rounds to 1
        pmf = upper - lower
        return _pmf_moments(k, pmf / pmf.sum())

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        x = np.rint(rng.lognormal(self.mu, self.sigma, size=n))
        return np.maximum(x, 1).astype(np.int64)

    def describe(self) -> str:
        return f"lognormal:{self.mu:g}:{self.sigma:g}"


@dataclass(frozen=True)
class Empirical:
    """Draws uniformly from observed values (e.g. one column of a trace)."""

    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise UserInputError("empirical: needs at least one value")
        for v in self.values:
            _check_int(v, "empirical value", minimum=0)

    def moments(self) -> Moments:
        x = np.asarray(self.values, dtype=np.float64)
        return float(x.mean()), float((x**2).mean()), float((x**3).mean())

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(np.asarray(self.values, dtype=np.int64), size=n, replace=True)

    def describe(self) -> str:
        return f"empirical:{len(self.values)} values"


LengthDistribution = Fixed | Uniform | Geometric | Lognormal | Empirical


def parse_distribution(spec: str) -> LengthDistribution:
    """Parse a spec string (see the module docstring); bad specs raise UserInputError."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    args = rest.split(":") if rest else []
    try:
        if kind == "fixed" and len(args) == 1:
            return Fixed(_as_int(args[0]))
        if kind == "uniform" and len(args) == 2:
            return Uniform(_as_int(args[0]), _as_int(args[1]))
        if kind == "geometric" and len(args) == 1:
            return Geometric(float(args[0]))
        if kind == "lognormal" and len(args) == 2:
            return Lognormal(float(args[0]), float(args[1]))
        if kind == "empirical" and rest:
            return Empirical(_empirical_values(rest))
    except ValueError as exc:
        if isinstance(exc, UserInputError):
            raise
        raise UserInputError(f"distribution {spec!r}: {exc}") from None
    raise UserInputError(
        f"bad distribution {spec!r}; expected fixed:N, uniform:LOW:HIGH, geometric:P, "
        "lognormal:MU:SIGMA or empirical:V1,V2,... / empirical:FILE"
    )


def _empirical_values(rest: str) -> tuple[int, ...]:
    path = Path(rest)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserInputError(f"{path}: cannot read empirical values ({exc})") from None
    elif any(ch.isdigit() for ch in rest) and all(ch.isdigit() or ch in ", .\t" for ch in rest):
        text = rest
    else:
        raise UserInputError(f"empirical: {rest!r} is neither a file nor a list of integers")
    tokens = [t for t in text.replace(",", " ").split() if t]
    if not tokens:
        raise UserInputError(f"empirical: no values in {rest!r}")
    return tuple(_as_int(t) for t in tokens)


def _as_int(text: str) -> int:
    value = float(text)
    if not math.isfinite(value) or value != int(value):
        raise UserInputError(f"expected a whole number, got {text!r}")
    return int(value)


def _check_int(value: object, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserInputError(f"{what} must be a whole number >= {minimum}, got {value!r}")


def _pmf_moments(k: np.ndarray, pmf: np.ndarray) -> Moments:
    return float(pmf @ k), float(pmf @ k**2), float(pmf @ k**3)
