"""The planner's cycle and the simulator's step agree on one shared case (issue 18, item 1).

Both charge the FFN's weight read once per microbatch: the planner's pipelined cycle
max(M t_A, M t_F, M t_C, t_A + 2 t_C + t_F) of per-microbatch times, and the simulator's exact
max-plus pipeline over L layers. The case is a roofline Qwen3-235B-A22B (FP8) bundle on H100,
8 attention + 8 FFN devices, B = 64, 2 microbatches (aiconfigurator's AFD setting in the issue).
"""

from __future__ import annotations

import numpy as np
import pytest

from afdserve.planner import RooflineSetup, load_hardware, load_model
from afdserve.planner.plan import plan
from afdserve.planner.roofline import Efficiency, roofline_costs
from afdserve.planner.stats import WorkloadStats
from afdserve.sim.costs import SimCosts
from afdserve.sim.pipeline import decode_load, stage_times, step_timing

THETA = 4000.0 + 250.0  # ISL 4000, OSL 500: the mean context over a request's decode


def _case(comm: str = "B", efficiency: Efficiency | None = None):
    spec = load_model("qwen3-235b-a22b", "fp8")
    hw = load_hardware("h100")
    setup = RooflineSetup(
        batch=64,
        attention_devices=8,
        ffn_devices=8,
        comm_scales_with=comm,
        link="scale-out",
        efficiency=efficiency or Efficiency(),
    )
    return roofline_costs(spec, hw, hw, setup).costs


def _sim_step_ms(costs, r: int, batch: int, microbatches: int) -> float:
    decoding = np.full((1, r), batch)
    context = np.full((1, r), batch * THETA)
    load = decode_load(decoding, context, microbatches)
    st = stage_times(SimCosts(costs), load, "microbatch")
    return float(step_timing(st, costs.num_layers, "microbatch").duration[0])


@pytest.mark.parametrize("comm", ["B", "rB"])
@pytest.mark.parametrize("r", [1, 2, 4])
@pytest.mark.parametrize("microbatches", [1, 2, 3])
def test_plan_cycle_equals_simulated_step(comm: str, r: int, microbatches: int) -> None:
    costs = _case(comm)
    row = plan(costs, 64, WorkloadStats(THETA), microbatches=microbatches, r_max=4).row(r)
    sim = _sim_step_ms(costs, r, 64, microbatches)
    # the simulator fills and drains the pipeline once a step: at most one layer's lap more
    assert row.step_ms <= sim + 1e-9
    assert sim == pytest.approx(row.step_ms, rel=0.02)


def test_ideal_model_is_optimistic_by_the_extra_weight_reads() -> None:
    """Without microbatches the planner charges beta_F once a layer; at M = 2 the simulator
    pays it twice, so the ideal cycle is below the simulated one by about that much."""
    costs = _case()
    ideal = plan(costs, 64, WorkloadStats(THETA), r_max=2).row(1)
    piped = plan(costs, 64, WorkloadStats(THETA), microbatches=2, r_max=2).row(1)
    sim = _sim_step_ms(costs, 1, 64, 2)
    assert ideal.step_ms < 0.8 * sim
    assert piped.step_ms == pytest.approx(sim, rel=0.02)


def test_microbatches_must_be_positive() -> None:
    from afdserve.errors import UserInputError

    with pytest.raises(UserInputError):
        plan(_case(), 64, WorkloadStats(THETA), microbatches=0)


@pytest.mark.parametrize("r", [1, 2, 8, 23, 30])
def test_plan_prices_each_sides_link_at_every_ratio(r: int) -> None:
    """`afdserve plan` searches r with one set of costs, so it prices both links ('both'): B
    tokens over an attention instance's 8 devices, r * B over the FFN's 8. At every r its cycle
    is the simulator's with that r's busier link (`at_ratio`, what `simulate` derives), including
    where the FFN's link sets the pace (r > 23 here)."""
    costs = _case("both")
    row = plan(costs, 64, WorkloadStats(THETA), microbatches=2, r_max=30).row(r)
    single = costs.at_ratio(r)
    assert single.comm_scales_with == ("B" if r == 1 else "rB")
    assert row.step_ms == pytest.approx(
        plan(single, 64, WorkloadStats(THETA), microbatches=2, r_max=30).row(r).step_ms
    )
    sim = _sim_step_ms(single, r, 64, 2)
    assert row.step_ms <= sim + 1e-9
    assert sim == pytest.approx(row.step_ms, rel=0.02)


def test_the_ffn_link_bounds_the_planned_ratio() -> None:
    """Charging only an attention instance's link (B tokens, the CLI's default before issue 18's
    fix) never lets the FFN's link bind. Where nothing else stops r, the planner kept adding
    attention instances: with an FFN whose compute hides under its weight streaming (the 'max'
    roofline, at the dense GEMMs' efficiency) r = 98 for this bundle. With both links priced,
    the r * B tokens over the FFN's 8 NICs lengthen every microbatch's round trip, and the
    planner's best r is the one where the simulator's throughput per instance peaks (9, below
    the closed form's 23, which leaves the round trip out)."""
    hidden = Efficiency(ffn_combine="max", moe_flops=None)
    attention_only = plan(_case("B", hidden), 64, WorkloadStats(THETA), microbatches=2)
    both = plan(_case("both", hidden), 64, WorkloadStats(THETA), microbatches=2, r_max=60)
    assert attention_only.r_int > 90

    def sim_per_instance(r: int) -> float:
        return r * 64 / ((r + 1) * _sim_step_ms(_case("both", hidden).at_ratio(r), r, 64, 2))

    assert both.r_int == max(range(1, 61), key=sim_per_instance) < 20
    assert both.r_int < both.r_int_unconstrained
    assert any("round trip" in n for n in both.notes)
