"""Workload statistics: theta and sigma_X^2 from traces and from distributions."""

from __future__ import annotations

import numpy as np
import pytest

from afdserve.errors import UserInputError
from afdserve.planner import (
    parse_distribution,
    stats_from_distributions,
    stats_from_lengths,
    stats_from_trace,
    trace_from_lengths,
)
from afdserve.planner.distributions import Empirical, Fixed, Geometric, Lognormal, Uniform


def brute_force(prompts, outputs):
    """Enumerate every decode step of every request: the definition, not the formula."""
    contexts = [p + j for p, d in zip(prompts, outputs, strict=True) for j in range(d)]
    x = np.asarray(contexts, dtype=np.float64)
    return x.mean(), x.var()


def test_two_request_trace() -> None:
    s = stats_from_lengths(np.array([100, 1000]), np.array([10, 1000]))
    assert s.theta == pytest.approx(1485.688, abs=5e-4)
    assert s.sigma2 == pytest.approx(101585.06, abs=5e-3)
    theta, var = brute_force([100, 1000], [10, 1000])
    assert s.theta == pytest.approx(theta, rel=1e-12)
    assert s.sigma2 == pytest.approx(var, rel=1e-9)
    # not the naive mean of P + D/2
    assert s.theta != pytest.approx(np.mean([100 + 5, 1000 + 500]))


def test_random_traces_match_enumeration() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(1, 30))
        p = rng.integers(0, 3000, size=n)
        d = rng.integers(0, 300, size=n)
        d[0] = max(d[0], 1)
        s = stats_from_lengths(p, d)
        theta, var = brute_force(p.tolist(), d.tolist())
        assert s.theta == pytest.approx(theta, rel=1e-12)
        assert s.sigma2 == pytest.approx(var, rel=1e-8, abs=1e-6)


def test_fixed_prompt_and_output() -> None:
    for p0, d in ((0, 1), (1000, 1), (1000, 7), (512, 256)):
        s = stats_from_distributions(Fixed(p0), Fixed(d))
        assert s.theta == pytest.approx(p0 + (d - 1) / 2)
        assert s.sigma2 == pytest.approx((d * d - 1) / 12)  # P + uniform{0..d-1}
        t = stats_from_lengths(np.array([p0]), np.array([d]))
        assert t.theta == pytest.approx(s.theta) and t.sigma2 == pytest.approx(s.sigma2)


def test_geometric_output() -> None:
    s = stats_from_distributions(Fixed(1000), Geometric(0.002))
    assert s.theta == pytest.approx(1499.0, abs=1e-9)
    # sigma^2 checked against a direct (truncated) sum over the geometric pmf
    p = 0.002
    d = np.arange(1, 40_000, dtype=np.float64)
    pmf = (1 - p) ** (d - 1) * p
    ed = pmf @ d
    s2 = pmf @ (d * 1000**2 + 1000 * d * (d - 1) + (d - 1) * d * (2 * d - 1) / 6)
    assert s.sigma2 == pytest.approx(s2 / ed - 1499.0**2, rel=1e-9)


@pytest.mark.parametrize(
    "prompt, output",
    [
        (Uniform(100, 2000), Uniform(1, 400)),
        (Fixed(800), Geometric(0.01)),
        (Lognormal(6.5, 0.8), Lognormal(4.0, 1.0)),
        (Empirical((10, 500, 3000)), Empirical((1, 50, 400, 40))),
    ],
)
def test_distribution_moments_match_large_samples(prompt, output) -> None:
    rng = np.random.default_rng(1234)
    n = 400_000
    analytic = stats_from_distributions(prompt, output)
    sampled = stats_from_lengths(prompt.sample(n, rng), output.sample(n, rng))
    assert sampled.theta == pytest.approx(analytic.theta, rel=0.03)
    assert sampled.sigma2 == pytest.approx(analytic.sigma2, rel=0.08)


def test_trace_statistics_use_output_as_decode_steps() -> None:
    trace = trace_from_lengths([100, 1000], [10, 1000], name="two")
    s = stats_from_trace(trace)
    assert s.source == "two" and s.num_requests == 2
    assert s.mean_prompt == 550 and s.mean_output == 505
    assert s.theta == pytest.approx(1485.688, abs=5e-4)


def test_no_output_tokens_is_an_error() -> None:
    with pytest.raises(UserInputError, match="no request has any output"):
        stats_from_lengths(np.array([10, 20]), np.array([0, 0]))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fixed:1000", Fixed(1000)),
        ("uniform:10:20", Uniform(10, 20)),
        ("geometric:0.002", Geometric(0.002)),
        ("lognormal:7:1.1", Lognormal(7.0, 1.1)),
        ("empirical:1,2,3", Empirical((1, 2, 3))),
    ],
)
def test_parse_distribution(spec, expected) -> None:
    assert parse_distribution(spec) == expected


def test_parse_empirical_file(tmp_path) -> None:
    f = tmp_path / "lens.txt"
    f.write_text("5 6\n7,8\n")
    assert parse_distribution(f"empirical:{f}") == Empirical((5, 6, 7, 8))


@pytest.mark.parametrize(
    "spec",
    [
        "fixed",
        "fixed:-3",
        "fixed:2.5",
        "uniform:5",
        "uniform:9:3",
        "geometric:0",
        "geometric:1.5",
        "lognormal:1:0",
        "lognormal:40:5",
        "empirical:",
        "empirical:nope",
        "zipf:1.2",
    ],
)
def test_parse_distribution_rejects(spec) -> None:
    with pytest.raises(UserInputError):
        parse_distribution(spec)
