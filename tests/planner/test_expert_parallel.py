"""Expert parallelism in the planner: the expected dispatch fan-out (against a Monte Carlo of
uniform routing) and the imbalance and redundant-slot terms of the FFN cost."""

from __future__ import annotations

import json

import numpy as np
import pytest

from afdserve.cli import main
from afdserve.errors import UserInputError
from afdserve.planner import RooflineSetup, load_hardware, load_model
from afdserve.planner.expert_parallel import expected_fanout
from afdserve.planner.roofline import memory_model, roofline_costs


@pytest.mark.parametrize("e,k,m", [(256, 8, 8), (128, 8, 8), (8, 2, 3), (16, 4, 2), (4, 2, 4)])
def test_fanout_matches_a_monte_carlo_of_uniform_routing(e, k, m):
    rng = np.random.default_rng(0)
    device = np.array([d for d in range(m) for _ in range((d + 1) * e // m - d * e // m)])
    picks = np.argsort(rng.random((20000, e)), axis=1)[:, :k]  # k distinct experts per token
    hits = np.array([len(set(device[row])) for row in picks])
    assert expected_fanout(e, k, m) == pytest.approx(hits.mean(), abs=0.03)


def test_fanout_edge_cases_and_deepseek():
    assert expected_fanout(256, 8, 8) == pytest.approx(5.29, abs=0.01)  # not 8
    assert expected_fanout(64, 4, 1) == 1.0
    assert expected_fanout(8, 2, 8) == pytest.approx(2.0)  # one expert per device
    assert expected_fanout(8, 2, 16) == pytest.approx(2.0)  # m > E: some devices hold none
    with pytest.raises(UserInputError, match="top_k"):
        expected_fanout(8, 9, 2)


def _qwen(**setup):
    hw = load_hardware("h800")
    return roofline_costs(
        load_model("qwen3-235b-a22b"), hw, hw, RooflineSetup(batch=64, ffn_devices=8, **setup)
    )


def test_imbalance_scales_the_ffn_compute_term_only():
    base, skewed = _qwen(), _qwen(expert_imbalance=1.5)
    assert skewed.costs.ffn.alpha == pytest.approx(1.5 * base.costs.ffn.alpha)
    assert skewed.costs.ffn.beta == base.costs.ffn.beta
    assert skewed.costs.comm == base.costs.comm


def test_redundant_slots_add_expert_weights_to_streaming_and_memory():
    base, more = _qwen(), _qwen(redundant_experts=32)
    assert more.costs.ffn.beta == pytest.approx(base.costs.ffn.beta * 160 / 128)
    hw, model = load_hardware("h800"), load_model("qwen3-235b-a22b")
    m0 = memory_model(model, hw, hw, RooflineSetup(batch=64, ffn_devices=8))
    m1 = memory_model(model, hw, hw, RooflineSetup(batch=64, ffn_devices=8, redundant_experts=32))
    assert m1.ffn_fixed_bytes == pytest.approx(m0.ffn_fixed_bytes * 160 / 128)
    # one device cannot hold a second replica of anything: no extra weights there
    one = RooflineSetup(batch=64, ffn_devices=1, redundant_experts=32)
    assert memory_model(model, hw, hw, one).ffn_fixed_bytes == m0.ffn_fixed_bytes


@pytest.mark.parametrize(
    "setup,match",
    [
        (dict(expert_imbalance=0.9), "must be >= 1"),
        (dict(redundant_experts=-1), "integer >= 0"),
    ],
)
def test_bad_ep_inputs_are_refused(setup, match):
    with pytest.raises(UserInputError, match=match):
        _qwen(**setup)


def test_the_planner_cli_takes_and_reports_the_ep_terms(capsys):
    args = "plan --model qwen3-235b-a22b --hw h800 --ffn-devices 8 --batch 64 --theta 2000 --json"
    ep = ["--expert-imbalance", "1.3", "--redundant-experts", "16"]
    assert main([*args.split(), *ep]) == 0
    out = json.dumps(json.loads(capsys.readouterr().out))
    assert '"expert_imbalance": 1.3' in out and '"expert_slot_factor": 1.125' in out
