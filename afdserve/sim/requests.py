"""Requests to simulate: per-request prompt and output lengths and arrival times.

Built from the planner's `Trace` (the shared traces or any file `load_trace` reads) or from the
planner's length distributions, with arrivals

- from the trace's own timestamps (optionally time-scaled to a target rate),
- Poisson or Gamma (bursty, coefficient of variation `cv`) at a given rate,
- all at time 0 (`offline`: a batch job, or closed loop where every freed slot is refilled at
  once, as the theory assumes).

A closed-loop run can also start in the stationary state (`stationary_start`): each slot holds a
request drawn with probability proportional to its output length, at a uniformly random step of
its decode, which is what a long-running bundle looks like (renewal theory), so no warm-up has
to be discarded.

Output lengths count the tokens a request generates (every one is a step); a length of 0 is
served as 1 (a server always returns a token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from afdserve.errors import UserInputError
from afdserve.planner.distributions import LengthDistribution
from afdserve.planner.workload import Trace

ARRIVAL_PROCESSES: tuple[str, ...] = ("trace", "poisson", "gamma", "offline")


@dataclass(frozen=True, eq=False)
class RequestSet:
    """N requests in arrival order (read-only arrays)."""

    prompt_len: np.ndarray
    """[N] int64 prompt tokens (>= 0)."""
    output_len: np.ndarray
    """[N] int64 generated tokens (>= 1)."""
    arrival_s: np.ndarray
    """[N] float64 seconds, non-decreasing (all 0 for offline and closed-loop runs)."""
    name: str = "requests"
    initial_progress: np.ndarray | None = None
    """Closed loop, stationary start: the first len(initial_progress) requests are already
    running at time 0 with this many tokens generated (they count for throughput, not for
    latency)."""
    cached_len: np.ndarray | None = None
    """[N] prompt tokens whose KV a prefix cache already holds at arrival (0 <= c < P, or 0 for
    an empty prompt): chunked prefill computes only the rest, its attention still reading the
    cached context (`afdserve.planner.prefix`). None: nothing cached."""

    def __post_init__(self) -> None:
        p = np.asarray(self.prompt_len, dtype=np.int64)
        d = np.asarray(self.output_len, dtype=np.int64)
        a = np.asarray(self.arrival_s, dtype=np.float64)
        if p.ndim != 1 or p.shape != d.shape or p.shape != a.shape:
            raise UserInputError(
                f"requests {self.name!r}: prompt, output and arrival arrays must be 1-D and of "
                f"equal length, got {p.shape}, {d.shape}, {a.shape}"
            )
        if p.size == 0:
            raise UserInputError(f"requests {self.name!r}: no requests")
        if np.any(p < 0) or np.any(d < 1):
            raise UserInputError(
                f"requests {self.name!r}: prompts must be >= 0 and outputs >= 1 tokens"
            )
        if not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(np.diff(a) < 0):
            raise UserInputError(
                f"requests {self.name!r}: arrivals must be finite, >= 0 and non-decreasing"
            )
        g = self.initial_progress
        if g is not None:
            g = np.asarray(g, dtype=np.int64)
            if g.ndim != 1 or g.size > p.size or np.any(g < 0) or np.any(g >= d[: g.size]):
                raise UserInputError(
                    f"requests {self.name!r}: initial progress must be per request, in "
                    "[0, output_len)"
                )
            g = _ro(g)
        c = self.cached_len
        if c is not None:
            c = np.asarray(c, dtype=np.int64)
            if c.shape != p.shape or np.any(c < 0) or np.any(c > np.maximum(p - 1, 0)):
                raise UserInputError(
                    f"requests {self.name!r}: cached prefix tokens must be per request, in "
                    "[0, prompt_len - 1]"
                )
            object.__setattr__(self, "cached_len", _ro(c))
        object.__setattr__(self, "prompt_len", _ro(p))
        object.__setattr__(self, "output_len", _ro(d))
        object.__setattr__(self, "arrival_s", _ro(a))
        object.__setattr__(self, "initial_progress", g)

    def __len__(self) -> int:
        return int(self.prompt_len.size)

    @property
    def num_initial(self) -> int:
        return 0 if self.initial_progress is None else int(self.initial_progress.size)

    @property
    def is_offline(self) -> bool:
        return bool(self.arrival_s[-1] == 0.0)

    @property
    def output_tokens(self) -> int:
        return int(self.output_len.sum())

    def subset(self, index: np.ndarray, name: str | None = None) -> RequestSet:
        """The requests at `index` (kept in arrival order); no stationary start."""
        idx = np.sort(np.asarray(index, dtype=np.int64))
        return RequestSet(
            self.prompt_len[idx],
            self.output_len[idx],
            self.arrival_s[idx],
            name=name or self.name,
            cached_len=None if self.cached_len is None else self.cached_len[idx],
        )


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def _outputs(d: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(d, dtype=np.int64), 1)


def from_trace(
    trace: Trace,
    *,
    limit: int | None = None,
    start: int = 0,
    arrivals: str = "trace",
    rate: float | None = None,
    cv: float = 1.0,
    seed: int = 0,
    cached: np.ndarray | None = None,
) -> RequestSet:
    """Requests start..start+limit of a trace, with its timestamps (`arrivals="trace"`; `rate`
    rescales them to that many requests/s), Poisson or Gamma arrivals at `rate`, or offline.
    `cached`: per trace request, prompt tokens a prefix cache holds (`planner.prefix`)."""
    n_all = len(trace)
    if not 0 <= start < n_all:
        raise UserInputError(f"trace {trace.name!r} has {n_all} requests; start {start} is out")
    stop = n_all if limit is None else min(n_all, start + _positive_int(limit, "limit"))
    p = trace.prompt_len[start:stop]
    d = _outputs(trace.output_len[start:stop])
    n = p.size
    if arrivals == "trace":
        if trace.arrival_s is None:
            raise UserInputError(
                f"trace {trace.name!r} has no arrival times; use Poisson or Gamma arrivals"
            )
        a = trace.arrival_s[start:stop] - trace.arrival_s[start]
        if rate is not None:
            span = float(a[-1])
            if n < 2 or span <= 0:
                raise UserInputError(
                    f"trace {trace.name!r}: cannot rescale {n} arrivals spanning {span} s"
                )
            a = a * ((n - 1) / span / _positive(rate, "rate"))
    else:
        a = arrival_times(arrivals, n, rate, cv=cv, seed=seed)
    if cached is not None and len(cached) != n_all:
        raise UserInputError(f"trace {trace.name!r}: {len(cached)} cached counts, {n_all} requests")
    c = None if cached is None else np.asarray(cached)[start:stop]
    return RequestSet(p, d, a, name=trace.name, cached_len=c)


def from_distributions(
    prompt: LengthDistribution,
    output: LengthDistribution,
    n: int,
    *,
    arrivals: str = "offline",
    rate: float | None = None,
    cv: float = 1.0,
    seed: int = 0,
) -> RequestSet:
    """n requests with independent prompt and output lengths."""
    n = _positive_int(n, "n")
    rng = np.random.default_rng(seed)
    p = prompt.sample(n, rng)
    d = _outputs(output.sample(n, rng))
    a = arrival_times(arrivals, n, rate, cv=cv, seed=seed + 1)
    name = f"prompt {prompt.describe()}, output {output.describe()}"
    return RequestSet(p, d, a, name=name)


def arrival_times(
    process: str, n: int, rate: float | None, *, cv: float = 1.0, seed: int = 0
) -> np.ndarray:
    """[n] arrival times (s) starting at 0: Poisson, Gamma (inter-arrival CV `cv`) or offline."""
    if process == "offline":
        return np.zeros(n)
    if process not in ("poisson", "gamma"):
        raise UserInputError(
            f"arrival process must be one of {', '.join(ARRIVAL_PROCESSES)}, got {process!r}"
        )
    lam = _positive(rate, "rate (requests/s)")
    rng = np.random.default_rng(seed)
    if process == "poisson":
        gaps = rng.exponential(1.0 / lam, size=n)
    else:
        c = _positive(cv, "cv")
        shape = 1.0 / (c * c)
        gaps = rng.gamma(shape, 1.0 / (lam * shape), size=n)
    t = np.cumsum(gaps)
    return t - t[0]


def closed_loop(
    prompt_len: np.ndarray,
    output_len: np.ndarray,
    *,
    num_slots: int,
    num_requests: int,
    stationary: bool = True,
    seed: int = 0,
    name: str = "closed loop",
) -> RequestSet:
    """A closed-loop run: `num_requests` lengths drawn with replacement from the given pairs
    (a trace's empirical distribution), all at time 0. With `stationary`, the first `num_slots`
    start mid-decode as in steady state (length-biased pick, uniform phase)."""
    p_src = np.asarray(prompt_len, dtype=np.int64)
    d_src = _outputs(output_len)
    if p_src.shape != d_src.shape or p_src.size == 0:
        raise UserInputError("closed loop: need equally long, non-empty length arrays")
    num_slots = _positive_int(num_slots, "num_slots")
    n = max(_positive_int(num_requests, "num_requests"), num_slots)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, p_src.size, size=n)
    p, d = p_src[pick], d_src[pick].copy()
    progress = None
    if stationary:
        weights = d_src / d_src.sum()
        first = rng.choice(p_src.size, size=num_slots, p=weights)
        p[:num_slots], d[:num_slots] = p_src[first], d_src[first]
        progress = np.floor(rng.random(num_slots) * d[:num_slots]).astype(np.int64)
    return RequestSet(p, d, np.zeros(n), name=name, initial_progress=progress)


def closed_loop_from_distributions(
    prompt: LengthDistribution,
    output: LengthDistribution,
    *,
    num_slots: int,
    num_requests: int,
    stationary: bool = True,
    seed: int = 0,
) -> RequestSet:
    """Closed loop with independent prompt and output lengths (a large sample stands in for the
    distribution, so the length-biased stationary pick is drawn from it)."""
    rng = np.random.default_rng(seed + 7919)
    pool = max(200_000, 4 * num_requests)
    return closed_loop(
        prompt.sample(pool, rng),
        output.sample(pool, rng),
        num_slots=num_slots,
        num_requests=num_requests,
        stationary=stationary,
        seed=seed,
        name=f"prompt {prompt.describe()}, output {output.describe()}",
    )


def _positive(v: float | None, what: str) -> float:
    if v is None or isinstance(v, bool) or not np.isfinite(v) or v <= 0:
        raise UserInputError(f"{what} must be a number > 0, got {v!r}")
    return float(v)


def _positive_int(v: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise UserInputError(f"{what} must be an integer >= 1, got {v!r}")
    return int(v)
