"""Expert parallelism in the planner: the expected dispatch fan-out (formula against Monte Carlo),
the imbalance factor and redundant slots in the roofline, and the flags that set them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afdserve.cli import main
from afdserve.errors import UserInputError
from afdserve.planner import RooflineSetup, load_hardware, load_model, memory_model, roofline_costs
from afdserve.planner.deployment import roofline_deployment
from afdserve.planner.expert_parallel import (
    block_sizes,
    check_redundant_slots,
    expected_fanout,
    redundant_slots_fit,
)
from afdserve.planner.roofline import Efficiency


def _monte_carlo(E: int, k: int, m: int, tokens: int, seed: int, replicas=None) -> float:
    """Mean distinct devices over `tokens` draws of k experts without replacement; with
    `replicas`, each chosen expert goes to one of its holders uniformly at random."""
    rng = np.random.default_rng(seed)
    if replicas is None:
        device_of = np.repeat(np.arange(m), block_sizes(E, m))
        holders = [[int(device_of[x])] for x in range(E)]
    else:
        holders = [[d for d, ids in enumerate(replicas) if x in ids] for x in range(E)]
    total = 0
    for _ in range(tokens):
        experts = rng.choice(E, size=k, replace=False)
        total += len({holders[x][rng.integers(len(holders[x]))] for x in experts})
    return total / tokens


def test_deepseek_v3_fanout_is_about_5_3_not_8() -> None:
    spec = load_model("deepseek-v3")
    assert (spec.num_experts, spec.experts_per_token) == (256, 8)
    f = expected_fanout(256, 8, 8)
    assert f == pytest.approx(8 * (1 - math.comb(224, 8) / math.comb(256, 8)), rel=1e-12)
    assert f == pytest.approx(5.2947, abs=1e-4)


@pytest.mark.parametrize(
    "E, k, m",
    [(256, 8, 8), (128, 8, 4), (10, 3, 4), (7, 2, 3), (8, 2, 16), (60, 4, 7)],
)
def test_formula_matches_monte_carlo(E, k, m) -> None:
    mc = _monte_carlo(E, k, m, tokens=20_000, seed=1)
    # sd of the count is below sqrt(k); over 20000 tokens the mean's sd is < 0.02
    assert expected_fanout(E, k, m) == pytest.approx(mc, abs=0.05)


def test_formula_with_replicas_matches_monte_carlo() -> None:
    # 8 experts over 3 devices plus 4 redundant slots: experts 0 and 1 on every device
    replicas = [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6, 7]]
    mc = _monte_carlo(8, 3, 3, tokens=30_000, seed=2, replicas=replicas)
    f = expected_fanout(8, 3, 3, replicas)
    assert f == pytest.approx(mc, abs=0.03)
    # the static placement written out is the closed form
    static = [list(range(d * 10 // 4, (d + 1) * 10 // 4)) for d in range(4)]
    assert expected_fanout(10, 3, 4, static) == pytest.approx(expected_fanout(10, 3, 4))


def test_edge_cases() -> None:
    assert expected_fanout(256, 8, 1) == 1.0
    assert expected_fanout(8, 2, 8) == pytest.approx(2.0)  # one expert a device
    assert expected_fanout(8, 2, 16) == pytest.approx(2.0)  # half the devices hold none
    assert expected_fanout(8, 8, 4) == pytest.approx(4.0)  # every expert: every device
    assert block_sizes(10, 4) == [2, 3, 2, 3]
    assert block_sizes(3, 5) == [0, 1, 0, 1, 1]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 12), st.integers(1, 80))
def test_fanout_bounds(E, k, m) -> None:
    k = min(k, E)
    f = expected_fanout(E, k, m)
    assert 1.0 - 1e-9 <= f <= min(k, m) + 1e-9
    assert f <= expected_fanout(E, k, m + 1) + 1e-9  # more devices: at least as many reached


def test_bad_fanout_inputs() -> None:
    with pytest.raises(UserInputError, match="top_k .* cannot exceed"):
        expected_fanout(8, 9, 2)
    with pytest.raises(UserInputError, match="num_devices must be an integer >= 1"):
        expected_fanout(8, 2, 0)
    with pytest.raises(UserInputError, match="held by no device"):
        expected_fanout(4, 2, 2, [[0, 1], [1, 2]])
    with pytest.raises(UserInputError, match="holds an expert twice"):
        expected_fanout(4, 2, 2, [[0, 0, 1], [2, 3]])
    with pytest.raises(UserInputError, match="3 device entries for 2"):
        expected_fanout(4, 2, 2, [[0], [1], [2, 3]])


def test_redundant_slots_limit() -> None:
    assert redundant_slots_fit(256, 8, 32) and redundant_slots_fit(8, 2, 8)
    assert not redundant_slots_fit(8, 2, 9) and not redundant_slots_fit(8, 1, 1)
    with pytest.raises(UserInputError, match="use at most 8 redundant experts"):
        check_redundant_slots(8, 2, 9)


# ---- the roofline -----------------------------------------------------------------------------

QWEN = load_model("qwen3-235b-a22b")
H20, H800 = load_hardware("h20"), load_hardware("h800")


def _costs(**kw):
    return roofline_costs(QWEN, H20, H800, RooflineSetup(batch=64, ffn_devices=8, **kw))


def test_comm_uses_the_expected_fanout() -> None:
    d = _costs()
    f = expected_fanout(128, 8, 8)
    assert d.terms["comm_fanout"] == pytest.approx(f) == pytest.approx(5.3394, abs=1e-4)
    assert d.costs.comm.alpha == pytest.approx(4096 * 2 * f / (50e9 * 0.8) * 1e3)
    assert any("fan-out" in n for n in d.notes)


def test_imbalance_one_changes_nothing_and_1_5_adds_half_the_routed_compute() -> None:
    base, same = _costs(), _costs(expert_imbalance=1.0, redundant_experts=0)
    assert same.costs == base.costs
    skew = _costs(expert_imbalance=1.5)
    routed_active = 8 * 3 * 4096 * 1536  # top-8 experts of 3 x hidden x 1536
    F = 8 * H800.flops("bf16") * Efficiency().moe_flops  # an MoE FFN's per-token rate
    assert skew.costs.ffn.alpha - base.costs.ffn.alpha == pytest.approx(
        0.5 * 2 * routed_active / F * 1e3
    )
    assert skew.terms["alpha_f_imbalance_ms"] == pytest.approx(0.5 * 2 * routed_active / F * 1e3)
    # the router's share of alpha_F is not scaled: a bit under 1.5x
    ratio = skew.costs.ffn.alpha / base.costs.ffn.alpha
    assert 1.49 < ratio < 1.5
    assert skew.costs.ffn.beta == base.costs.ffn.beta
    assert skew.costs.attention == base.costs.attention and skew.costs.comm == base.costs.comm


def test_imbalance_is_capped_at_the_device_count() -> None:
    d = roofline_costs(QWEN, H800, H800, RooflineSetup(batch=64, ffn_devices=2, expert_imbalance=3))
    assert d.terms["expert_imbalance"] == 2.0
    assert any("capped at 2" in n for n in d.notes)
    one = roofline_costs(QWEN, H800, H800, RooflineSetup(batch=64, expert_imbalance=1.5))
    assert one.costs == roofline_costs(QWEN, H800, H800, RooflineSetup(batch=64)).costs


def test_redundant_experts_add_weights_to_stream_and_hold() -> None:
    base, red = _costs(), _costs(redundant_experts=32)
    routed_bytes = 128 * 3 * 4096 * 1536 * 2  # per layer, bf16
    M = 8 * H800.memory_bw * Efficiency().memory_bw
    assert red.costs.ffn.beta - base.costs.ffn.beta == pytest.approx(
        32 / 128 * routed_bytes / M * 1e3
    )
    assert red.costs.ffn.alpha == base.costs.ffn.alpha
    setup = RooflineSetup(batch=64, ffn_devices=8)
    m0 = memory_model(QWEN, H20, H800, setup)
    m1 = memory_model(QWEN, H20, H800, RooflineSetup(batch=64, ffn_devices=8, redundant_experts=32))
    assert m1.ffn_fixed_bytes - m0.ffn_fixed_bytes == pytest.approx(94 * 32 / 128 * routed_bytes)


def test_bad_expert_parallel_inputs() -> None:
    with pytest.raises(UserInputError, match="a number >= 1"):
        RooflineSetup(batch=1, expert_imbalance=0.9)
    with pytest.raises(UserInputError, match="a number >= 1"):
        RooflineSetup(batch=1, expert_imbalance=float("nan"))
    with pytest.raises(UserInputError, match="redundant experts must be an integer >= 0"):
        RooflineSetup(batch=1, redundant_experts=-1)
    with pytest.raises(UserInputError, match="more than the 128 experts"):
        _costs(redundant_experts=128 * 7 + 1)
    with pytest.raises(UserInputError, match="use at most 0 redundant experts"):
        roofline_costs(QWEN, H800, H800, RooflineSetup(batch=64, redundant_experts=32))
    with pytest.raises(UserInputError, match="apply to MoE models; llama-3.1-8b is dense"):
        h100 = load_hardware("h100")
        roofline_costs(
            load_model("llama-3.1-8b"), h100, h100, RooflineSetup(batch=8, expert_imbalance=1.2)
        )


def test_sizing_leaves_room_for_the_redundant_slots() -> None:
    spec, h100 = load_model("qwen3-30b-a3b"), load_hardware("h100")
    plain = roofline_deployment(spec, h100, h100, RooflineSetup(batch=64), 1000.0)
    assert plain.setup.ffn_devices == 1
    dep = roofline_deployment(
        spec, h100, h100, RooflineSetup(batch=64, redundant_experts=16), 1000.0
    )
    assert dep.setup.ffn_devices == 2
    assert "16 redundant experts" in dep.notes[-1]
    ep = dep.to_dict()["expert_parallel"]
    assert ep["slots_per_device"] == (128 + 16) / 2 and ep["redundant_experts"] == 16
    assert plain.to_dict()["expert_parallel"]["fanout"] == 1.0


# ---- the commands -----------------------------------------------------------------------------

PLAN = ["plan", "--model", "qwen3-235b-a22b", "--attention-hw", "h20", "--ffn-hw", "h800"]
PLAN += ["--theta", "1226.5", "--batch", "64"]


def test_plan_prints_the_expert_parallel_assumptions(capsys) -> None:
    assert main([*PLAN, "--expert-imbalance", "1.5", "--redundant-experts", "16"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("expert parallelism:"))
    assert "8 FFN device(s), a token reaches 5.34 of them" in line
    assert "expert imbalance 1.5 (max/mean)" in line and "16 redundant experts" in line
    assert "18 expert slots a device" in line
    assert main([*PLAN, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["expert_parallel"]["expert_imbalance"] == 1.0
    assert d["expert_parallel"]["redundant_experts"] == 0
    assert d["roofline"]["terms"]["comm_fanout"] == pytest.approx(5.3394, abs=1e-4)


def test_the_planner_cli_takes_and_reports_the_ep_terms(capsys) -> None:
    args = "plan --model qwen3-235b-a22b --hw h800 --ffn-devices 8 --batch 64 --theta 2000 --json"
    ep = ["--expert-imbalance", "1.3", "--redundant-experts", "16"]
    assert main([*args.split(), *ep]) == 0
    out = json.dumps(json.loads(capsys.readouterr().out))
    assert '"expert_imbalance": 1.3' in out and '"expert_slot_factor": 1.125' in out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*PLAN, "--expert-imbalance", "0.5"], "a number >= 1"),
        ([*PLAN, "--redundant-experts", "-2"], "an integer >= 0"),
        ([*PLAN, "--ffn-devices", "8", "--redundant-experts", "2000"], "more FFN devices"),
        (
            ["plan", "--alpha-a", "1", "--beta-a", "1", "--alpha-f", "1", "--beta-f", "1"]
            + ["--theta", "1", "--batch", "4", "--expert-imbalance", "1.2"],
            "--expert-imbalance only applies with --model",
        ),
        (
            ["plan", "--model", "llama-3.1-8b", "--hw", "h100", "--theta", "1", "--batch", "4"]
            + ["--redundant-experts", "2"],
            "is dense",
        ),
    ],
)
def test_plan_rejects_bad_expert_parallel_flags(capsys, argv, message) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
