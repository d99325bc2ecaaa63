"""Closed-form ratio: the issue's acceptance values and the structure behind them."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afdserve.errors import UserInputError
from afdserve.planner import Affine, CostWeights, StageCosts, WorkloadStats, closed_form, plan
from afdserve.planner.ratio import continuous_optimum, objective, stage_times

# the issue's coefficients (ms): alpha_A, beta_A, alpha_F, beta_F, alpha_C, beta_C
ISSUE = dict(alpha_a=5e-5, beta_a=0.6, alpha_f=0.02, beta_f=1.0, alpha_c=0.005, beta_c=0.2)
B, THETA = 64, 2000.0


def issue_costs(**overrides: float) -> StageCosts:
    return StageCosts.explicit(**{**ISSUE, **overrides})


def with_ffn_combine(costs: StageCosts, combine: str, fixed: float = 0.0) -> StageCosts:
    """The same coefficients with the FFN summed (fitted) or a roofline max(alpha n, beta),
    plus `fixed` ms."""
    ffn = dataclasses.replace(costs.ffn, combine=combine, fixed=fixed)
    return dataclasses.replace(costs, ffn=ffn)


def test_roofline_ffn_closed_form_is_where_compute_catches_the_slowest_floor() -> None:
    """tF = max(alpha_F r B, beta_F): no r_peak (the line has no intercept), and r* is where
    the FFN's compute reaches the larger of attention and its own weight streaming."""
    costs = with_ffn_combine(issue_costs(), "max")
    cf = closed_form(costs, B, THETA)
    t_a = 5e-5 * B * THETA + 0.6  # 7.0 ms
    assert cf.r_peak == 0.0
    assert cf.r_a == pytest.approx(t_a / (0.02 * B))
    assert cf.r_star == pytest.approx(t_a / (0.02 * B))
    # weights slower than attention: the floor sets r*
    slow = with_ffn_combine(issue_costs(beta_f=10.0), "max")
    assert closed_form(slow, B, THETA).r_star == pytest.approx(10.0 / (0.02 * B))
    # the summed FFN of the same numbers needs its intercept covered first
    assert closed_form(issue_costs(), B, THETA).r_a == pytest.approx((t_a - 1.0) / (0.02 * B))
    assert isinstance(costs.ffn, Affine) and costs.ffn(10) == 1.0 and costs.ffn(100) == 2.0
    # a fixed kernel latency lifts the line and the floor alike
    lat = with_ffn_combine(issue_costs(), "max", 0.4)
    assert closed_form(lat, B, THETA).r_star == pytest.approx((t_a - 0.4) / (0.02 * B))
    assert closed_form(lat, B, THETA).r_peak == pytest.approx(math.sqrt(0.4 / (0.02 * B)))


def test_issue_closed_form_values() -> None:
    cf = closed_form(issue_costs(), B, THETA)
    assert cf.r_a == pytest.approx(4.6875, abs=1e-12)
    assert cf.r_c == pytest.approx(-0.375, abs=1e-12)
    assert cf.r_peak == pytest.approx(0.8839, abs=5e-5)
    assert cf.r_star == pytest.approx(4.6875, abs=1e-12)


def test_issue_throughput_per_instance_and_best_integer() -> None:
    result = plan(issue_costs(), B, WorkloadStats(THETA))
    got = [row.throughput_per_instance for row in result.table[:5]]
    assert got == pytest.approx([4.5714, 6.0952, 6.8571, 7.3143, 7.2072], abs=5e-5)
    assert result.r_int_unconstrained == 4
    assert result.r_int == 4
    best = max(result.table, key=lambda row: row.throughput_per_instance)
    assert best.r == 4  # the floor/ceil rule agrees with a search of the whole table


def test_issue_small_alpha_a_makes_r_peak_optimal_and_quadrupling_b_halves_it() -> None:
    costs = issue_costs(alpha_a=5e-6)
    cf = closed_form(costs, B, THETA)
    assert cf.r_star == pytest.approx(0.8839, abs=5e-5)
    assert cf.r_star == cf.r_peak
    assert cf.r_a < cf.r_peak and cf.r_c < cf.r_peak
    assert closed_form(costs, 4 * B, THETA).r_peak == pytest.approx(cf.r_peak / 2, rel=1e-12)
    # r* < 1, so the best integer is 1
    assert plan(costs, B, WorkloadStats(THETA)).r_int == 1


def test_idle_fractions_and_cycle() -> None:
    row = plan(issue_costs(), B, WorkloadStats(THETA)).row(2)
    assert row.t_attention == pytest.approx(7.0)
    assert row.t_ffn == pytest.approx(3.56)
    assert row.t_comm == pytest.approx(0.52)
    assert row.cycle_ms == pytest.approx(7.0)
    assert row.attention_idle == pytest.approx(0.0)
    assert row.ffn_idle == pytest.approx(1 - 3.56 / 7.0)


def test_cost_weights_move_r_peak_by_the_square_root_of_the_price_ratio() -> None:
    costs = issue_costs(alpha_a=5e-6)
    base = closed_form(costs, B, THETA).r_peak
    pricey_ffn = closed_form(costs, B, THETA, CostWeights(attention=1.0, ffn=4.0)).r_peak
    assert pricey_ffn == pytest.approx(2 * base)


def test_num_layers_scales_step_time_and_slo() -> None:
    costs = StageCosts.explicit(**ISSUE, num_layers=10)
    result = plan(costs, B, WorkloadStats(THETA), tpot_slo_ms=72.0)
    assert result.row(1).step_ms == pytest.approx(70.0)
    # tau(4) = 7 -> 70 ms fits; tau(5) = 7.4 -> 74 ms does not
    assert [row.tpot_ok for row in result.table[:6]] == [True] * 4 + [False] * 2
    assert result.r_int == 4
    tight = plan(costs, B, WorkloadStats(THETA), tpot_slo_ms=69.0)
    assert tight.r_int is None
    assert any("TPOT" in note for note in tight.notes)


def test_slo_caps_the_ratio_below_the_unconstrained_optimum() -> None:
    costs = issue_costs(alpha_a=1e-5)  # tA = 1.88: FFN-bound from r = 1
    free = plan(costs, B, WorkloadStats(THETA))
    capped = plan(costs, B, WorkloadStats(THETA), tpot_slo_ms=2.5)
    assert free.r_int_unconstrained == capped.r_int_unconstrained
    assert capped.r_int is not None and capped.row(capped.r_int).step_ms <= 2.5
    assert capped.r_int == max(row.r for row in capped.table if row.tpot_ok)


@settings(max_examples=200, deadline=None)
@given(
    alpha_a=st.floats(1e-7, 1e-3),
    beta_a=st.floats(0.0, 5.0),
    alpha_f=st.floats(1e-4, 0.1),
    beta_f=st.floats(0.0, 5.0),
    alpha_c=st.floats(0.0, 0.05),
    beta_c=st.floats(0.0, 2.0),
    batch=st.integers(1, 512),
    theta=st.floats(0.0, 20000.0),
    price_ratio=st.floats(0.1, 10.0),
    combine=st.sampled_from(["sum", "max"]),
    fixed=st.sampled_from([0.0, 0.05, 0.5]),
)
def test_closed_form_is_the_continuous_argmax(
    alpha_a, beta_a, alpha_f, beta_f, alpha_c, beta_c, batch, theta, price_ratio, combine, fixed
) -> None:
    costs = with_ffn_combine(
        StageCosts.explicit(alpha_a, beta_a, alpha_f, beta_f, alpha_c, beta_c), combine, fixed
    )
    weights = CostWeights(attention=1.0, ffn=price_ratio)
    cf = closed_form(costs, batch, theta, weights)

    def f(r: float) -> float:
        return objective(r, batch, stage_times(costs, batch, theta, r).cycle, 1, weights)

    if cf.r_star > 0:
        # r* beats a dense grid of alternatives (up to float rounding)
        grid = [cf.r_star * k / 200 for k in range(1, 1000)]
        assert f(cf.r_star) >= max(f(r) for r in grid) * (1 - 1e-9)
        assert continuous_optimum(costs, batch, theta, weights) == pytest.approx(
            cf.r_star, rel=1e-6, abs=1e-9
        )


@settings(max_examples=100, deadline=None)
@given(
    alpha_a=st.floats(1e-7, 1e-3),
    beta_a=st.floats(0.0, 5.0),
    alpha_f=st.floats(1e-4, 0.1),
    beta_f=st.floats(0.01, 5.0),
    alpha_c=st.floats(0.0, 0.1),
    beta_c=st.floats(0.0, 2.0),
    batch=st.integers(1, 256),
    theta=st.floats(0.0, 20000.0),
    combine=st.sampled_from(["sum", "max"]),
    fixed=st.sampled_from([0.0, 0.05, 0.5]),
)
def test_rb_communication_optimum_beats_the_grid(
    alpha_a, beta_a, alpha_f, beta_f, alpha_c, beta_c, batch, theta, combine, fixed
) -> None:
    costs = with_ffn_combine(
        StageCosts.explicit(
            alpha_a, beta_a, alpha_f, beta_f, alpha_c, beta_c, comm_scales_with="rB"
        ),
        combine,
        fixed,
    )
    r_star = closed_form(costs, batch, theta).r_star

    def f(r: float) -> float:
        return objective(r, batch, stage_times(costs, batch, theta, r).cycle, 1, CostWeights())

    grid = [r_star * k / 200 for k in range(1, 1000)]
    assert f(r_star) >= max(f(r) for r in grid) * (1 - 1e-9)


def test_rb_communication_grows_with_r() -> None:
    costs = issue_costs(alpha_c=0.03, comm_scales_with="rB")
    result = plan(costs, B, WorkloadStats(THETA))
    assert result.row(3).t_comm == pytest.approx(0.03 * 3 * B + 0.2)
    # comm overtakes the FFN (0.03 > 0.02 per token), so it caps r before the FFN does
    assert result.r_star == pytest.approx((7.0 - 0.2) / (0.03 * B))
    assert result.r_int == 3


def test_best_integer_is_floor_or_ceil_of_r_star() -> None:
    for alpha_a in (1e-6, 2e-5, 5e-5, 1e-4, 3e-4):
        result = plan(issue_costs(alpha_a=alpha_a), B, WorkloadStats(THETA))
        assert result.r_int in (max(1, math.floor(result.r_star)), max(1, math.ceil(result.r_star)))
        best = max(result.table, key=lambda row: row.throughput_per_instance)
        assert best.r == result.r_int


def test_plan_rejects_bad_input() -> None:
    costs, stats = issue_costs(), WorkloadStats(THETA)
    with pytest.raises(UserInputError, match="batch"):
        plan(costs, 0, stats)
    with pytest.raises(UserInputError, match="theta"):
        WorkloadStats(-1.0)
    with pytest.raises(UserInputError, match="alpha_F"):
        plan(issue_costs(alpha_f=0.0), B, stats)
    with pytest.raises(UserInputError, match="SLO"):
        plan(costs, B, stats, tpot_slo_ms=0.0)
    with pytest.raises(UserInputError, match="r_max"):
        plan(costs, B, stats, r_max=0)


def test_negative_coefficients_are_rejected() -> None:
    with pytest.raises(UserInputError, match="alpha must be >= 0"):
        issue_costs(alpha_a=-1e-5)
    with pytest.raises(UserInputError, match="beta must be >= 0"):
        issue_costs(beta_c=-0.1)


def test_result_serialises_to_json() -> None:
    import json

    result = plan(issue_costs(comm_scales_with="rB", alpha_c=0.0), B, WorkloadStats(THETA, 1e5))
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    for key in ("theta", "r_a", "r_c", "r_peak", "r_star", "r_int", "r_int_barrier", "table"):
        assert key in d
    assert d["r_c"] is None  # -inf (no comm growth) is written as null
    assert d["table"][0]["r"] == 1
    assert {"cycle_ms", "throughput_per_instance", "attention_idle", "ffn_idle"} <= set(
        d["table"][0]
    )


def test_r_int_beyond_a_short_table() -> None:
    result = plan(issue_costs(), B, WorkloadStats(THETA), r_max=3)
    assert len(result.table) == 3
    assert result.r_int == 4  # checked directly, not only among the tabulated ratios
    assert any("beyond the table" in note for note in result.notes)
    # with an SLO that r = 4 breaks (tau(4) = 7 > 6.9), nothing in the table is feasible either
    assert plan(issue_costs(), B, WorkloadStats(THETA), r_max=3, tpot_slo_ms=6.9).r_int is None
