"""`plan` from the other inputs `afdserve plan` accepts: a measured profile file for the costs,
length distributions for the workload, and the microbatch count it reports."""

from __future__ import annotations

import json

import pytest

from afdserve.planner import (
    StageCosts,
    WorkloadStats,
    parse_distribution,
    plan,
    stats_from_distributions,
)

ISSUE = StageCosts.explicit(5e-5, 0.6, 0.02, 1.0, 0.005, 0.2)
PROFILE = {
    "source": "measured",
    "model": "m",
    "device": "cpu",
    "units": "ms",
    "num_layers": 4,
    "attention": {"alpha": 5e-5, "beta": 0.6},
    "ffn": {"alpha": 0.02, "beta": 1.0},
    "comm": {"alpha": 0.005, "beta": 0.2},
}


def test_a_profile_file_plans_per_layer_and_caps_r_by_the_step(tmp_path) -> None:
    f = tmp_path / "profile.json"
    f.write_text(json.dumps(PROFILE))
    costs = StageCosts.from_profile(f)
    result = plan(costs, 64, WorkloadStats(2000.0), tpot_slo_ms=29)
    assert result.costs.num_layers == 4 and result.costs.source == "measured"
    assert result.r_int_unconstrained == 4
    assert result.r_int == 4  # step 4 * 7 = 28 ms fits 29 ms; r = 5 would take 29.6 ms
    assert [row.tpot_ok for row in result.table[3:5]] == [True, False]
    assert result.to_dict()["coefficients"]["source"] == "measured"


def test_length_distributions_give_theta_and_a_barrier_ratio() -> None:
    stats = stats_from_distributions(
        parse_distribution("fixed:1000"), parse_distribution("geometric:0.002")
    )
    result = plan(ISSUE, 64, stats)
    assert result.theta == pytest.approx(1499.0)
    assert result.workload.sigma2 is not None and result.workload.sigma2 > 0
    # a known variance is what makes the barrier-aware ratio computable at all
    assert result.r_int_barrier is not None
    assert plan(ISSUE, 64, WorkloadStats(1499.0)).r_int_barrier is None


def test_the_plan_reports_the_microbatches_that_hide_communication() -> None:
    result = plan(ISSUE, 64, WorkloadStats(2000.0))
    assert result.microbatches is not None and result.microbatches.microbatches == 3
    assert result.to_dict()["microbatches"]["m"] == 3
