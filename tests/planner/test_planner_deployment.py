"""A roofline deployment (`afdserve plan --model`): sizing each side by memory, the objective's
default weights, what it adds to a plan, and the plan it leads to."""

from __future__ import annotations

import dataclasses

import pytest

from afdserve.planner import (
    CostWeights,
    RooflineSetup,
    WorkloadStats,
    load_hardware,
    load_model,
    load_trace,
    plan,
    stats_from_trace,
    traces_dir,
)
from afdserve.planner.deployment import roofline_deployment

HAVE_TRACES = (traces_dir() / "azure_2023_conv.csv").is_file()
needs_traces = pytest.mark.skipif(not HAVE_TRACES, reason="shared traces not found")


def qwen3_on_h20_and_h800(theta: float, **devices: int):
    return roofline_deployment(
        load_model("qwen3-235b-a22b"),
        load_hardware("h20"),
        load_hardware("h800"),
        RooflineSetup(batch=64),
        theta,
        **devices,
    )


def test_each_side_spans_the_fewest_devices_whose_memory_holds_it() -> None:
    dep = qwen3_on_h20_and_h800(2000.0)
    # 454 GB of experts need 8 x 80 GiB; the attention side (weights + KV of 64 slots) fits one
    assert (dep.setup.attention_devices, dep.setup.ffn_devices) == (1, 8)
    m = dep.memory
    assert m.ffn_capacity_bytes == pytest.approx(8 * 80 * 2**30 * 0.9)
    # the next count down, 4, would not hold the experts; one H20 holds the attention side
    assert 4 * 80 * 2**30 * 0.9 < m.ffn_fixed_bytes <= m.ffn_capacity_bytes
    kv = 64 * 2000.0 * m.kv_bytes_per_context_token
    assert m.attention_fixed_bytes + kv <= m.attention_capacity_bytes == pytest.approx(96e9 * 0.9)
    assert dep.notes == (
        "attention instance sized to 1 x h20 by memory",
        "FFN instance sized to 8 x h800 by memory",
    )
    # more context per slot needs more KV: the attention side grows with theta
    assert qwen3_on_h20_and_h800(200_000.0).setup.attention_devices > 1


def test_given_device_counts_are_kept_and_scale_the_coefficients() -> None:
    sized = qwen3_on_h20_and_h800(2000.0)
    given = qwen3_on_h20_and_h800(2000.0, attention_devices=2, ffn_devices=8)
    assert (given.setup.attention_devices, given.setup.ffn_devices) == (2, 8)
    assert given.notes == ()  # nothing was sized
    # twice the devices: twice the bandwidth streaming the attention side's weights
    assert given.costs.attention.beta < sized.costs.attention.beta
    assert given.costs.ffn == sized.costs.ffn


def test_default_weights_follow_catalog_prices_then_device_counts() -> None:
    priced = roofline_deployment(
        load_model("llama-3.1-8b"),
        load_hardware("h800"),
        load_hardware("h800"),
        RooflineSetup(batch=64),
        1500.0,
        ffn_devices=2,
    )
    weights, note = priced.default_weights()
    assert weights == CostWeights(2.0, 4.0, "$/h")  # 1 and 2 devices at $2/h
    assert note == "instance prices from the hardware catalog"
    weights, note = qwen3_on_h20_and_h800(2000.0).default_weights()  # H20 has no price
    assert weights == CostWeights(1.0, 8.0, "device")
    assert note == "no catalog price for both sides: objective is throughput per device"
    h100 = load_hardware("h100")
    same = roofline_deployment(
        load_model("llama-3.1-8b"), h100, h100, RooflineSetup(batch=64), 1500.0
    )
    assert same.setup.attention_devices == same.setup.ffn_devices == 1
    assert same.default_weights() == (CostWeights(), None)


def test_to_dict_describes_model_hardware_and_unit_costs() -> None:
    dep = qwen3_on_h20_and_h800(2000.0)
    d = dep.to_dict()
    assert list(d) == [
        "model",
        "hardware",
        "efficiency",
        "roofline",
        "unit_costs",
        "expert_parallel",
        "sizing_notes",
    ]
    assert d["model"]["name"] == "qwen3-235b-a22b" and d["model"]["num_layers"] == 94
    assert d["hardware"]["attention"]["devices"] == 1 and d["hardware"]["ffn"]["devices"] == 8
    assert d["hardware"]["ffn"]["name"] == "h800"
    assert d["efficiency"] == dataclasses.asdict(dep.setup.efficiency)
    assert set(d["unit_costs"]) == {"ffn"}  # only the H800 has a catalog price
    assert d["unit_costs"]["ffn"]["usd_per_flop"] == pytest.approx(5.617e-19, rel=1e-3)
    assert d["sizing_notes"] == list(dep.notes)
    ep = d["expert_parallel"]  # what the FFN's expert parallelism assumed (balanced by default)
    assert ep["ffn_devices"] == 8 and ep["expert_imbalance"] == 1.0
    assert ep["redundant_experts"] == 0 and ep["slots_per_device"] == 16


@needs_traces
def test_the_issue_model_plan_meets_its_slo() -> None:
    stats = stats_from_trace(load_trace("azure-conv"))
    dep = qwen3_on_h20_and_h800(stats.theta)
    weights, _ = dep.default_weights()
    result = plan(dep.costs, 64, stats, weights=weights, tpot_slo_ms=50, memory=dep.memory)
    assert result.workload.source == "azure-conv"
    assert result.costs.num_layers == 94 and result.costs.source == "roofline"
    assert result.r_int is not None
    assert result.row(result.r_int).step_ms <= 50
    assert result.memory is not None and result.memory.attention_ok and result.memory.ffn_ok


def test_explicit_prices_become_the_objective() -> None:
    h100 = load_hardware("h100")
    dep = roofline_deployment(
        load_model("llama-3.1-8b"), h100, h100, RooflineSetup(batch=64), 1500.0
    )
    result = plan(dep.costs, 64, WorkloadStats(1500.0), weights=CostWeights(3, 3, "$/h"))
    assert result.to_dict()["objective"] == {
        "unit": "$/h",
        "attention_weight": 3.0,
        "ffn_weight": 3.0,
    }
