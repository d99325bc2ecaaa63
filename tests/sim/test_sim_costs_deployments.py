"""Simulator costs (profile JSON, roofline extras) and deployments (aggregated, PD split,
several AFD bundles)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from afdserve.errors import UserInputError
from afdserve.planner import RooflineSetup, StageCosts, load_hardware, load_model
from afdserve.sim import (
    SLO,
    BundleConfig,
    RequestSet,
    SimCosts,
    roofline_sim_costs,
    run_afd,
    run_aggregated,
    run_pd_split,
)


def test_profile_round_trip_through_planner_and_simulator(tmp_path) -> None:
    c = SimCosts.explicit(
        1e-5,
        0.1,
        2e-3,
        0.3,
        1e-4,
        0.02,
        num_layers=12,
        prefill_token_ms=1e-4,
        prefill_pair_ms=1e-8,
        step_alpha_ms=0.01,
        step_beta_ms=0.5,
        afd_step_ms=0.2,
        step_prefill_token_ms=2e-3,
        kv_transfer_ms_per_token=3e-3,
        kv_transfer_beta_ms=0.1,
    )
    path = tmp_path / "p.json"
    path.write_text(json.dumps(c.to_profile_dict()))
    assert SimCosts.from_profile(path) == c
    planner = StageCosts.from_profile(path)  # the planner reads it too, extras kept
    assert planner.ffn.alpha == 2e-3 and planner.num_layers == 12
    assert planner.extra["prefill"]["token_ms"] == 1e-4
    bad = c.to_profile_dict()
    bad["step"] = {"alpha": -1.0}
    with pytest.raises(UserInputError, match="step_alpha_ms"):
        SimCosts.from_profile_dict(bad, origin="x")


def test_roofline_extras_follow_the_catalog() -> None:
    spec, hw = load_model("llama-3.1-8b"), load_hardware("h100")
    c = roofline_sim_costs(spec, hw, hw, RooflineSetup(batch=64))
    flops = 989e12 * 0.6
    assert c.prefill_token_ms == pytest.approx(2 * spec.attention_params / flops * 1e3)
    assert c.prefill_pair_ms == pytest.approx(spec.attention_flops_per_context_token / flops * 1e3)
    # KV of one token, all layers: 32 x 4096 B over a 400 Gb/s NIC at 80%
    assert c.kv_transfer_ms_per_token == pytest.approx(32 * 4096 / (50e9 * 0.8) * 1e3)
    assert c.stages.attention.alpha == pytest.approx(4096 / (3.35e12 * 0.9) * 1e3, rel=1e-4)


def _open_loop(n: int = 120, seed: int = 0) -> RequestSet:
    rng = np.random.default_rng(seed)
    return RequestSet(
        rng.integers(50, 1500, n), rng.integers(1, 200, n), np.cumsum(rng.exponential(0.02, n))
    )


def test_deployments_serve_every_request() -> None:
    c = SimCosts.explicit(
        3e-6,
        0.05,
        5e-4,
        0.1,
        2e-4,
        0.01,
        num_layers=8,
        prefill_token_ms=2e-4,
        prefill_pair_ms=3e-8,
        kv_transfer_ms_per_token=1e-3,
    )
    reqs = _open_loop()
    slo = SLO(500.0, 20.0)
    tokens = int(reqs.output_len.sum())
    afd, runs = run_afd(
        c, BundleConfig(attention_workers=2, slots=16, microbatches=2), reqs, bundles=2, slo=slo
    )
    assert len(runs) == 2 and afd.instances == 6 and afd.output_tokens == tokens
    agg, runs = run_aggregated(c, reqs, instances=3, slots=16, slo=slo)
    assert len(runs) == 3 and agg.output_tokens == tokens and agg.ffn_idle is None
    pd, runs = run_pd_split(
        c,
        c,
        reqs,
        prefill_instances=1,
        decode_instances=2,
        prefill_slots=16,
        decode_slots=16,
        slo=slo,
    )
    assert pd.instances == 3 and pd.output_tokens == tokens
    for rep in (afd, agg, pd):
        assert rep.requests_finished == len(reqs) and rep.unfinished == 0
        assert rep.ttft_ms.count == len(reqs)
        assert 0.0 <= rep.slo_attainment <= 1.0
        assert rep.ttft_ms.p99 >= rep.ttft_ms.median > 0
    # PD: the decode pool's first token waits for the KV: ITL includes that gap
    assert pd.itl_ms.count == tokens - len(reqs)
