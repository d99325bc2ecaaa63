"""The step simulator: the theory's acceptance checks, bulk closed loop == step engine, open
loop, admission, prefill, arrivals."""

from __future__ import annotations

import numpy as np
import pytest

from afdserve.planner import (
    StageCosts,
    WorkloadStats,
    parse_distribution,
    plan,
    stats_from_distributions,
)
from afdserve.sim import (
    BundleConfig,
    RequestSet,
    SimCosts,
    closed_loop,
    closed_loop_from_distributions,
    simulate,
    simulate_closed_loop,
    summarize,
)
from afdserve.sim import engine as engine_mod


@pytest.mark.parametrize("stationary", [True, False])
def test_mean_context_converges_to_theta_with_geometric_outputs(stationary: bool) -> None:
    """Acceptance: closed loop with geometric decode lengths -> long-run resident context per
    slot -> theta = E[D P + D (D - 1) / 2] / E[D]."""
    prompt, output = parse_distribution("uniform:100:900"), parse_distribution("geometric:0.01")
    theta = stats_from_distributions(prompt, output).theta  # 500 + 99 = 599
    reqs = closed_loop_from_distributions(
        prompt, output, num_slots=256, num_requests=40_000, stationary=stationary, seed=1
    )
    cfg = BundleConfig(attention_workers=4, slots=64, pipeline="ideal", prefill="none")
    run = simulate_closed_loop(SimCosts.explicit(1e-4, 0.1, 1e-3, 0.2), cfg, reqs)
    warm = 0 if stationary else 1000  # a fresh start needs a few mean lifetimes to forget
    rep = summarize([run], warmup_steps=warm)
    assert rep.steps > 5000
    assert rep.mean_context_per_slot == pytest.approx(theta, rel=0.02)


@pytest.mark.parametrize("r", [1, 2, 3, 5, 8])
def test_constant_stages_give_the_planners_throughput(r: int) -> None:
    """Acceptance: with every stage constant (alpha_A = 0), simulated throughput per instance
    equals the planner's r B / ((r + 1) L tau), exactly."""
    L, B = 4, 32
    costs = StageCosts.explicit(0.0, 0.6, 0.02, 1.0, 0.005, 0.2, num_layers=L)
    expected = plan(costs, B, WorkloadStats(theta=1000.0)).row(r).throughput_per_instance  # per ms
    reqs = closed_loop(np.full(10, 500), np.full(10, 40), num_slots=r * B, num_requests=4000)
    cfg = BundleConfig(attention_workers=r, slots=B, pipeline="ideal", prefill="none")
    rep = summarize([simulate_closed_loop(SimCosts(costs), cfg, reqs)])
    assert rep.throughput_per_instance / 1e3 == pytest.approx(expected, rel=1e-12)
    # and the unpipelined M = 1 bundle: tau = tA + 2 tC + tF
    cfg1 = BundleConfig(attention_workers=r, slots=B, microbatches=1, prefill="none")
    rep1 = summarize([simulate_closed_loop(SimCosts(costs), cfg1, reqs)])
    tau = 0.6 + 2 * (0.005 * B + 0.2) + 0.02 * r * B + 1.0
    assert rep1.throughput_per_instance / 1e3 == pytest.approx(
        r * B / ((r + 1) * L * tau), rel=1e-12
    )


@pytest.mark.parametrize("stationary", [True, False])
@pytest.mark.parametrize("pipeline,M", [("ideal", 1), ("microbatch", 1), ("microbatch", 3)])
def test_bulk_closed_loop_equals_the_step_engine(stationary: bool, pipeline: str, M: int) -> None:
    rng = np.random.default_rng(0)
    p, d = rng.integers(10, 3000, 500), rng.geometric(0.02, 500)
    reqs = closed_loop(p, d, num_slots=96, num_requests=3000, stationary=stationary, seed=2)
    cfg = BundleConfig(
        attention_workers=3, slots=32, microbatches=M, pipeline=pipeline, prefill="none"
    )
    costs = SimCosts.explicit(5e-5, 0.3, 2e-3, 0.5, 1e-3, 0.1, num_layers=3, step_alpha_ms=0.01)
    a = simulate(costs, cfg, reqs, stop_when_unfilled=True)
    b = simulate_closed_loop(costs, cfg, reqs)
    assert a.num_steps == b.num_steps > 100
    for f in (
        "step_duration",
        "attention_busy",
        "ffn_busy",
        "tokens_out",
        "itl_tokens",
        "decode_context",
        "finish",
    ):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    c = simulate_closed_loop(costs, cfg, reqs, max_steps=50)
    e = simulate(costs, cfg, reqs, stop_when_unfilled=True, max_steps=50)
    np.testing.assert_array_equal(c.step_duration, e.step_duration)


def _reqs(p, d, a) -> RequestSet:
    return RequestSet(np.asarray(p), np.asarray(d), np.asarray(a, dtype=float))


def test_single_request_chunked_prefill_and_decode_times() -> None:
    """One request: ceil(P / budget) prefill steps (first token at the last), then D - 1 decode
    steps; TTFT is the prefill steps' time, TPOT the decode steps'."""
    c = SimCosts.explicit(1e-3, 0.5, 1e-2, 1.0, num_layers=2, prefill_token_ms=1e-3)
    cfg = BundleConfig(slots=4, pipeline="colocated", token_budget=100)
    run = simulate(c, cfg, _reqs([250], [5], [2.0]))
    assert run.num_steps == 3 + 4
    assert run.step_start[0] == pytest.approx(2000.0)  # idle until the arrival
    prefill_ms = run.step_duration[:3].sum()
    assert run.first_token[0] - run.arrival[0] == pytest.approx(prefill_ms)
    rep = summarize([run])
    assert rep.output_tokens == 5
    assert rep.tpot_ms.mean == pytest.approx(run.step_duration[3:].mean())
    # decode step j (j = 1..4) reads the prompt plus j tokens
    np.testing.assert_array_equal(run.decode_context[3:], [251, 252, 253, 254])


def test_open_loop_conserves_tokens_and_orders_times() -> None:
    rng = np.random.default_rng(5)
    n = 300
    arr = np.cumsum(rng.exponential(0.02, n))
    reqs = _reqs(rng.integers(1, 2000, n), rng.integers(1, 300, n), arr)
    cfg = BundleConfig(attention_workers=2, slots=16, microbatches=2, token_budget=512)
    c = SimCosts.explicit(
        2e-5, 0.2, 1e-3, 0.3, 5e-4, 0.05, num_layers=8, prefill_token_ms=5e-4, prefill_pair_ms=1e-7
    )
    run = simulate(c, cfg, reqs)
    rep = summarize([run])
    assert rep.requests_finished == n and rep.unfinished == 0
    assert rep.output_tokens == int(reqs.output_len.sum())
    assert np.all(run.first_token >= run.arrival)
    assert np.all(run.finish >= run.first_token)
    assert np.all(np.diff(run.step_start) > 0)
    assert np.all(run.decode_slots <= 32)
    assert 0.0 <= rep.attention_idle <= 1.0 and 0.0 <= rep.ffn_idle <= 1.0


def test_arrival_lookahead_is_exact() -> None:
    """Skipping arrival checks for steps that surely start before the next arrival changes
    nothing against checking before every step."""
    rng = np.random.default_rng(9)
    n = 200
    reqs = _reqs(
        rng.integers(1, 500, n), rng.integers(1, 100, n), np.cumsum(rng.exponential(0.05, n))
    )
    c = SimCosts.explicit(3e-5, 0.2, 1e-3, 0.3, 5e-4, 0.05, num_layers=6, prefill_token_ms=5e-4)
    cfg = BundleConfig(attention_workers=2, slots=8, microbatches=2, token_budget=256)
    a = simulate(c, cfg, reqs)
    orig = engine_mod._Engine._step_upper
    engine_mod._Engine._step_upper = lambda self, horizon: 0.0  # look before every step
    try:
        b = simulate(c, cfg, reqs)
    finally:
        engine_mod._Engine._step_upper = orig
    assert a.num_steps == b.num_steps
    np.testing.assert_allclose(a.first_token, b.first_token, rtol=1e-12)
    np.testing.assert_allclose(a.finish, b.finish, rtol=1e-12)


def test_kv_capacity_bounds_admission() -> None:
    """Each request reserves prompt + output: with room for two at a time, at most two run."""
    reqs = _reqs([100] * 6, [50] * 6, [0.0] * 6)
    c = SimCosts.explicit(1e-4, 0.1, 1e-3, 0.2)
    cfg = BundleConfig(slots=8, pipeline="colocated", prefill="none", kv_capacity_tokens=300)
    run = simulate(c, cfg, reqs)
    assert run.decode_slots.max() == 2
    assert summarize([run]).requests_finished == 6
    with pytest.raises(ValueError, match="KV tokens"):
        simulate(c, BundleConfig(slots=8, kv_capacity_tokens=100), reqs)


def test_admission_balances_workers() -> None:
    reqs = _reqs([10] * 8, [1000] * 8, [0.0] * 8)
    cfg = BundleConfig(attention_workers=4, slots=8, pipeline="ideal", prefill="none")
    run = simulate(SimCosts.explicit(1e-4, 0.1, 1e-3, 0.2), cfg, reqs, max_steps=3)
    assert run.attention_busy.shape == (3, 4)
    busy = run.attention_busy[0]
    assert np.allclose(busy, busy[0])  # two requests on each worker


def test_same_seed_same_result() -> None:
    rng = np.random.default_rng(1)
    reqs = _reqs(
        rng.integers(1, 800, 100), rng.integers(1, 80, 100), np.cumsum(rng.exponential(0.01, 100))
    )
    cfg = BundleConfig(attention_workers=2, slots=8, microbatches=2)
    c = SimCosts.explicit(3e-5, 0.2, 1e-3, 0.3, num_layers=4)
    a, b = simulate(c, cfg, reqs), simulate(c, cfg, reqs)
    np.testing.assert_array_equal(a.step_duration, b.step_duration)
    np.testing.assert_array_equal(a.finish, b.finish)


def test_bad_configs_are_rejected() -> None:
    with pytest.raises(ValueError, match="microbatches"):
        BundleConfig(slots=2, microbatches=4)
    with pytest.raises(ValueError, match="colocated"):
        BundleConfig(attention_workers=2, pipeline="colocated")
    with pytest.raises(ValueError, match="token_budget"):
        simulate(
            SimCosts.explicit(0, 1, 1e-3, 1),
            BundleConfig(slots=64, token_budget=32),
            _reqs([5], [5], [0]),
        )
