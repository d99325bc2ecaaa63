"""Barrier refinement and the microbatch rule."""

from __future__ import annotations

import numpy as np
import pytest

from afdserve.errors import UserInputError
from afdserve.planner import (
    StageCosts,
    WorkloadStats,
    expected_cycle_time,
    expected_max_std_normal,
    expected_max_with_floor,
    min_microbatches,
    plan,
    plan_microbatches,
)


def test_expected_max_of_standard_normals() -> None:
    got = [expected_max_std_normal(r) for r in (1, 2, 3, 4)]
    assert got == pytest.approx([0.0, 0.5642, 0.8463, 1.0294], abs=5e-5)
    assert got[1] == pytest.approx(1 / np.sqrt(np.pi), abs=1e-9)  # exact for r = 2


def test_expected_max_grows_like_sqrt_2_log_r() -> None:
    values = [expected_max_std_normal(r) for r in (8, 64, 512)]
    assert values == sorted(values)
    assert values[-1] < np.sqrt(2 * np.log(512))


@pytest.mark.parametrize(
    "floor, mu, sigma, r",
    [(6.12, 7.0, 0.2, 4), (7.4, 7.0, 0.2, 5), (0.0, 5.0, 1.0, 3), (9.0, 5.0, 1.0, 16)],
)
def test_expected_max_with_floor_matches_monte_carlo(floor, mu, sigma, r) -> None:
    rng = np.random.default_rng(42)
    z = rng.standard_normal((400_000, r)).max(axis=1)
    mc = np.maximum(floor, mu + sigma * z)
    got = expected_max_with_floor(floor, mu, sigma, r)
    assert got == pytest.approx(mc.mean(), abs=4 * mc.std() / np.sqrt(mc.size) + 1e-9)


def test_far_below_the_floor_or_far_above() -> None:
    # attention far slower than the FFN: E[tau] = mu + sigma * E[max]
    assert expected_max_with_floor(0.0, 100.0, 1.0, 4) == pytest.approx(
        100.0 + expected_max_std_normal(4), abs=1e-7
    )
    # FFN far slower: the floor
    assert expected_max_with_floor(100.0, 1.0, 1.0, 4) == pytest.approx(100.0, abs=1e-12)
    assert expected_max_with_floor(3.0, 2.0, 0.0, 7) == 3.0


def test_expected_cycle_time_uses_alpha_a_sqrt_b_sigma2() -> None:
    costs = StageCosts.explicit(5e-5, 0.6, 0.02, 1.0, 0.005, 0.2)
    sigma = 5e-5 * np.sqrt(64 * 250_000.0)  # 0.2 ms
    for r in (1, 4, 5):
        floor = max(0.02 * r * 64 + 1.0, 0.52)
        expect = expected_max_with_floor(floor, 7.0, sigma, r)
        assert expected_cycle_time(costs, 64, 2000.0, 250_000.0, r) == pytest.approx(expect)
    # no variance: the mean-field cycle
    assert expected_cycle_time(costs, 64, 2000.0, 0.0, 4) == pytest.approx(7.0)


def test_barrier_can_move_the_best_ratio() -> None:
    costs = StageCosts.explicit(5e-5, 0.6, 0.02, 1.0, 0.005, 0.2)
    mean_field = plan(costs, 64, WorkloadStats(2000.0))
    assert mean_field.r_int_barrier is None  # no variance known
    barrier = plan(costs, 64, WorkloadStats(2000.0, 250_000.0))
    assert barrier.r_int == 4
    # the barrier slows r = 4 (7 -> 7.206 ms) more than r = 5 (7.4 -> 7.408 ms)
    assert barrier.row(4).expected_cycle_ms == pytest.approx(7.0 + 0.2 * 1.0294, abs=1e-4)
    assert barrier.r_int_barrier == 5
    for row in barrier.table:
        assert row.expected_cycle_ms >= row.cycle_ms - 1e-12


def test_barrier_input_checks() -> None:
    with pytest.raises(UserInputError):
        expected_max_std_normal(0)
    with pytest.raises(UserInputError):
        expected_max_with_floor(1.0, 1.0, -1.0, 2)


@pytest.mark.parametrize(
    "ratio, m", [(0.1, 3), (0.4, 3), (0.6, 4), (0.9, 4), (0.0, 2), (0.5, 3), (1.0, 4), (2.25, 7)]
)
def test_min_microbatches(ratio, m) -> None:
    assert min_microbatches(ratio) == m


def test_min_microbatches_rejects_negative() -> None:
    with pytest.raises(UserInputError):
        min_microbatches(-0.1)


def test_plan_microbatches_uses_per_microbatch_times() -> None:
    costs = StageCosts.explicit(5e-5, 0.6, 0.02, 1.0, 0.005, 0.2)
    mb = plan_microbatches(costs, 64, 2000.0, 4)
    assert mb is not None and mb.microbatches == 3
    slots = 64 / 3
    assert mb.t_attention == pytest.approx(5e-5 * slots * 2000 + 0.6)
    assert mb.t_ffn == pytest.approx(0.02 * 4 * slots + 1.0)
    assert mb.t_comm == pytest.approx(0.005 * slots + 0.2)
    assert mb.microbatches >= 2 * (1 + mb.tc_over_tf)
    # one slot cannot be split: no m <= B satisfies m >= 2
    assert plan_microbatches(costs, 1, 2000.0, 4) is None
