"""Deployment families of the search (issue 18, item 3): AFD decode plus a prefill pool, and the
all-to-all a colocated expert-parallel instance pays inside itself."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from afdserve.planner import RooflineSetup, load_hardware, load_model
from afdserve.planner.expert_parallel import expected_fanout
from afdserve.sim.config import BundleConfig
from afdserve.sim.costs import colocated_a2a, roofline_sim_costs
from afdserve.sim.deployments import run_pd_split
from afdserve.sim.pipeline import decode_load, stage_times, step_timing
from afdserve.sim.requests import RequestSet
from afdserve.sim.search import FAMILIES, SearchSpace, _candidates


def test_colocated_a2a_follows_the_fanout_and_the_link() -> None:
    spec, h100 = load_model("qwen3-235b-a22b"), load_hardware("h100")
    setup = RooflineSetup(batch=64, attention_devices=8, ffn_devices=8)
    alpha, beta = colocated_a2a(spec, h100, setup)
    fan = expected_fanout(128, 8, 8)
    by_hand = 2 * 4096 * 2 * fan * 7 / 8 / (8 * 450e9 * 0.8) * 1e3  # NVLink inside the board
    assert alpha == pytest.approx(by_hand)
    assert beta == pytest.approx(0.02)
    one = dataclasses.replace(setup, attention_devices=1, ffn_devices=1)
    assert colocated_a2a(spec, h100, one) == (0.0, 0.0)
    dense = load_model("llama-3.1-8b")
    assert colocated_a2a(dense, h100, setup) == (0.0, 0.0)


def test_a_colocated_moe_step_pays_its_all_to_all() -> None:
    spec, h100 = load_model("qwen3-235b-a22b"), load_hardware("h100")
    costs = roofline_sim_costs(
        spec, h100, h100, RooflineSetup(batch=64, attention_devices=8, ffn_devices=8)
    )
    free = dataclasses.replace(costs, colocated_a2a_ms_per_token=0.0, colocated_a2a_beta_ms=0.0)
    load = decode_load(np.array([[64]]), np.array([[64 * 2000.0]]), 1)

    def step(c):
        return step_timing(stage_times(c, load, "colocated"), c.num_layers, "colocated").duration[0]

    extra = spec.num_layers * (costs.colocated_a2a_ms_per_token * 64 + costs.colocated_a2a_beta_ms)
    assert step(costs) - step(free) == pytest.approx(extra)


def test_afd_decode_behind_a_prefill_pool() -> None:
    """The decode side of a PD split can be an AFD bundle: every request is prefilled by the
    pool, its KV handed to the bundle, and decoded there to its last token."""
    spec, h100 = load_model("qwen3-30b-a3b"), load_hardware("h100")
    costs = roofline_sim_costs(spec, h100, h100, RooflineSetup(batch=16, ffn_devices=2))
    n = 40
    reqs = RequestSet(np.full(n, 500), np.full(n, 20), np.linspace(0.0, 1.0, n), name="fixed")
    dec = BundleConfig(
        attention_workers=2, slots=16, microbatches=2, pipeline="microbatch", prefill="none"
    )
    rep, runs = run_pd_split(
        costs,
        costs,
        reqs,
        prefill_instances=1,
        decode_instances=1,
        prefill_slots=16,
        decode_slots=16,
        decode_config=dec,
    )
    assert rep.requests_finished == n
    assert rep.throughput_tok_s > 0 and rep.ttft_ms.count == n


def test_the_search_has_the_afd_plus_prefill_family() -> None:
    assert FAMILIES == ("afd", "afd+prefill", "aggregated", "pd-split")
    spec, h100 = load_model("qwen3-30b-a3b"), load_hardware("h100")
    space = SearchSpace(ratios=(1, 2), batches=(32,), microbatches=(2,))
    cands = _candidates(spec, h100, 8, 1000.0, space, [], None)
    mixed = [c for c in cands if c.family == "afd+prefill"]
    assert mixed
    for c in mixed:
        p = c.params
        bundle = p["r"] * p["attention_devices"] + p["ffn_devices"]
        assert c.devices == p["prefill_instances"] * p["prefill_devices"] + p["bundles"] * bundle
        assert c.devices <= 8 and p["prefill_instances"] >= 1 and p["bundles"] >= 1
        assert c.decode_costs is not None and c.decode_costs.kv_transfer_ms_per_token > 0


def test_the_search_sizes_every_instance_with_the_kv_dtype() -> None:
    """FP8 KV halves the bytes a slot's context holds, so the same devices hold about twice
    the KV tokens, the attention reads half the bytes per context token, and a prefill
    instance hands off half the bytes."""
    spec, h100 = load_model("qwen3-30b-a3b"), load_hardware("h100")
    space = SearchSpace(ratios=(1,), batches=(32,), microbatches=(2,))

    def by_key(kv: str) -> dict:
        cands = _candidates(spec, h100, 8, 1000.0, space, [], {"kv_dtype": kv})
        return {(c.family, repr(sorted(c.params.items()))): c for c in cands}

    bf16, fp8 = by_key("bf16"), by_key("fp8")
    assert bf16.keys() == fp8.keys()
    for key, c in bf16.items():
        other = fp8[key]
        assert other.kv_capacity_tokens >= 2 * c.kv_capacity_tokens - 1
        a, b = c.costs.stages.attention.alpha, other.costs.stages.attention.alpha
        assert b == pytest.approx(a / 2)
        if c.family == "afd+prefill":
            assert other.decode_costs.kv_transfer_ms_per_token == pytest.approx(
                c.decode_costs.kv_transfer_ms_per_token / 2
            )


def test_the_kv_hand_off_lands_on_the_attention_instance_over_the_link_between() -> None:
    """A prefill instance hands a prompt's KV to one attention instance: over that instance's
    own gA links (not the FFN's, even where the A<->F traffic is charged there), by NVLink when
    the whole deployment fits in one scale-up domain, else over the NICs."""
    spec, h100 = load_model("qwen3-30b-a3b"), load_hardware("h100")
    kv_bytes = spec.num_layers * spec.kv_elems_per_token * 2  # bf16

    def expected(g_a: int, link: str) -> float:
        return kv_bytes / (g_a * h100.link_bw(link) * 0.8) * 1e3

    rb = roofline_sim_costs(
        spec, h100, h100, RooflineSetup(batch=32, ffn_devices=4, comm_scales_with="rB")
    )
    assert rb.kv_transfer_ms_per_token == pytest.approx(expected(1, "scale-out"))
    space = SearchSpace(ratios=(1, 2, 4), batches=(32,), microbatches=(2,))
    seen = set()
    cands = [c for n in (8, 16) for c in _candidates(spec, h100, n, 1000.0, space, [], None)]
    for c in cands:
        if c.family != "afd+prefill":
            continue
        link = "scale-up" if c.devices <= h100.scale_up_domain else "scale-out"
        seen.add(link)
        got = c.decode_costs.kv_transfer_ms_per_token
        assert got == pytest.approx(expected(c.params["attention_devices"], link))
    assert seen == {"scale-up", "scale-out"}
