"""Metrics (quantiles, SLOs, merging units) and request sets (traces, arrival processes)."""

from __future__ import annotations

import numpy as np
import pytest

from afdserve.errors import UserInputError
from afdserve.planner import parse_distribution, trace_from_lengths
from afdserve.sim import (
    SLO,
    BundleConfig,
    LatencyStats,
    RequestSet,
    SimCosts,
    arrival_times,
    closed_loop,
    from_distributions,
    from_trace,
    simulate,
    summarize,
)
from afdserve.sim.metrics import weighted_quantiles


def test_weighted_quantiles_match_repeated_samples() -> None:
    v = np.array([3.0, 1.0, 2.0, 10.0])
    w = np.array([1, 2, 3, 4])
    expanded = np.repeat(v, w)
    for q in (0.1, 0.5, 0.9, 0.99):
        assert weighted_quantiles(v, w.astype(float), [q])[0] == np.quantile(
            expanded, q, method="inverted_cdf"
        )
    s = LatencyStats.of(v, w.astype(float))
    assert s.mean == pytest.approx(expanded.mean())
    assert s.count == 10
    empty = LatencyStats.of(np.zeros(0))
    assert empty.count == 0 and empty.to_dict()["mean"] is None


def test_goodput_counts_only_requests_meeting_both_slos() -> None:
    reqs = RequestSet(np.array([10, 10, 5000]), np.array([20, 1, 20]), np.array([0.0, 0.0, 0.0]))
    c = SimCosts.explicit(1e-3, 1.0, 1e-2, 1.0, prefill_token_ms=1e-3)
    cfg = BundleConfig(slots=4, pipeline="colocated", token_budget=256)
    run = simulate(c, cfg, reqs)
    ttft = run.first_token - run.arrival
    slo_ttft = float(np.sort(ttft)[1]) + 1e-9  # the long prompt misses it
    rep = summarize([run], slo=SLO(ttft_ms=slo_ttft))
    assert rep.slo_attainment == pytest.approx(2 / 3)
    assert rep.goodput_tok_s == pytest.approx(21 / rep.span_s)
    with pytest.raises(UserInputError):
        SLO(ttft_ms=-1)


def test_summaries_of_parallel_units_add_up() -> None:
    c = SimCosts.explicit(1e-4, 0.2, 1e-3, 0.3)
    cfg = BundleConfig(slots=4, pipeline="colocated", prefill="none")
    a = simulate(c, cfg, RequestSet(np.full(4, 50), np.full(4, 30), np.zeros(4)))
    b = simulate(c, cfg, RequestSet(np.full(4, 50), np.full(4, 30), np.zeros(4)))
    one, two = summarize([a]), summarize([a, b], devices=4)
    assert two.instances == 2 and two.devices == 4
    assert two.throughput_tok_s == pytest.approx(2 * one.throughput_tok_s)
    assert two.throughput_per_device == pytest.approx(one.throughput_tok_s / 2)
    assert two.attention_idle == pytest.approx(one.attention_idle)


def test_from_trace_rescales_timestamps_to_a_rate() -> None:
    tr = trace_from_lengths([5, 6, 7, 8, 9], [1, 2, 3, 0, 5], arrival_s=[10, 11, 13, 14, 18])
    r = from_trace(tr)
    np.testing.assert_allclose(r.arrival_s, [0, 1, 3, 4, 8])
    assert r.output_len.min() == 1  # a zero-token request still returns one token
    fast = from_trace(tr, rate=2.0)
    assert fast.arrival_s[-1] == pytest.approx(2.0)  # 4 gaps at 2 req/s
    assert len(from_trace(tr, limit=2, start=1)) == 2
    with pytest.raises(UserInputError, match="no arrival times"):
        from_trace(trace_from_lengths([1], [1]))


@pytest.mark.parametrize("process,cv", [("poisson", 1.0), ("gamma", 3.0), ("gamma", 0.5)])
def test_arrival_processes_have_the_asked_rate_and_burstiness(process: str, cv: float) -> None:
    t = arrival_times(process, 20_000, 50.0, cv=cv, seed=3)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)
    with pytest.raises(UserInputError, match="rate"):
        arrival_times(process, 10, None)


def test_closed_loop_stationary_start_is_length_biased() -> None:
    rng = np.random.default_rng(0)
    d = rng.geometric(0.05, 5000)
    reqs = closed_loop(np.ones(5000, int), d, num_slots=4000, num_requests=5000, seed=1)
    assert reqs.num_initial == 4000
    first = reqs.output_len[:4000]
    # length-biased: E[D | picked] = E[D^2] / E[D]
    assert first.mean() == pytest.approx((d.astype(float) ** 2).mean() / d.mean(), rel=0.05)
    assert np.all(reqs.initial_progress < first)


def test_request_set_validation() -> None:
    with pytest.raises(UserInputError, match="no requests"):
        RequestSet(np.zeros(0), np.zeros(0), np.zeros(0))
    with pytest.raises(UserInputError, match="outputs >= 1"):
        RequestSet(np.array([1]), np.array([0]), np.array([0.0]))
    with pytest.raises(UserInputError, match="non-decreasing"):
        RequestSet(np.array([1, 1]), np.array([1, 1]), np.array([1.0, 0.0]))
    r = from_distributions(
        parse_distribution("fixed:7"),
        parse_distribution("uniform:1:3"),
        50,
        arrivals="poisson",
        rate=10.0,
    )
    assert len(r) == 50 and set(r.prompt_len.tolist()) == {7}
