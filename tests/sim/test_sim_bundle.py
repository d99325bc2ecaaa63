"""One bundle simulated on its own (`afdserve simulate --ratio`): the config the flags give, the
requests it serves, its report's text and its plots."""

from __future__ import annotations

import numpy as np
import pytest

from afdserve.planner import RooflineSetup, load_hardware, load_model, load_trace, traces_dir
from afdserve.planner.workload import trace_from_lengths
from afdserve.sim.bundle import bundle_config, plot_bundle, simulate_bundle
from afdserve.sim.costs import roofline_sim_costs
from afdserve.sim.metrics import SLO
from afdserve.sim.render import render_report

HAVE_TRACES = (traces_dir() / "azure_2023_conv.csv").is_file()
needs_traces = pytest.mark.skipif(not HAVE_TRACES, reason="shared traces not found")
SLOS = SLO(ttft_ms=1000, tpot_ms=50)


@pytest.fixture(scope="module")
def costs():
    h100 = load_hardware("h100")
    return roofline_sim_costs(load_model("llama-3.1-8b"), h100, h100, RooflineSetup(batch=16))


def test_bundle_config_follows_the_flags() -> None:
    open_loop = bundle_config(2, 16, 2, 2048, saturated=False)
    assert (open_loop.attention_workers, open_loop.slots, open_loop.microbatches) == (2, 16, 2)
    assert open_loop.pipeline == "microbatch" and open_loop.prefill == "chunked"
    assert open_loop.token_budget == 2048
    closed = bundle_config(1, 4096, 1, 2048, saturated=True)
    assert closed.prefill == "none"  # the theory's setting: prompts already cached
    assert closed.token_budget == 4096  # a full decode step always fits the budget


@needs_traces
def test_a_trace_replay_serves_every_request(costs, tmp_path) -> None:
    trace = load_trace("azure-conv")
    cfg = bundle_config(2, 16, 2, 2048, saturated=False)
    sim = simulate_bundle(costs, trace, cfg, requests=50, slo=SLOS)
    rep = sim.report
    assert rep.label == "2A1F M=2 B=16"
    assert rep.requests_finished == 50 and rep.unfinished == 0
    assert rep.instances == 3  # two attention workers and the FFN
    # the trace's own timestamps (s), from its first request; the simulator counts in ms
    assert sim.run.arrival / 1e3 == pytest.approx(trace.arrival_s[:50] - trace.arrival_s[0])
    assert rep.slo_attainment is not None
    plot_bundle(sim, tmp_path, slo=SLOS)
    assert (tmp_path / "timeline.png").is_file() and (tmp_path / "latency_cdf.png").is_file()


def test_synthetic_arrivals_come_at_the_rate_asked(costs) -> None:
    rng = np.random.default_rng(0)
    trace = trace_from_lengths(rng.integers(50, 200, 400), rng.integers(5, 20, 400), name="t")
    cfg = bundle_config(1, 16, 1, 2048, saturated=False)
    sim = simulate_bundle(costs, trace, cfg, requests=400, arrivals="poisson", rate=20.0, seed=1)
    rate = (len(sim.run.arrival) - 1) / (sim.run.arrival.max() / 1e3)  # arrivals in ms
    assert rate == pytest.approx(20.0, rel=0.15)
    assert sim.report.requests_finished == 400


def test_a_saturated_loop_draws_at_least_four_requests_per_slot(costs) -> None:
    trace = trace_from_lengths(np.array([100, 300]), np.array([10, 30]), name="two")
    cfg = bundle_config(2, 8, 1, 2048, saturated=True)
    sim = simulate_bundle(costs, trace, cfg, requests=5, saturated=True)
    assert len(sim.run.arrival) == 4 * cfg.num_slots and not sim.run.arrival.any()
    assert set(sim.run.prompt_len.tolist()) <= {100, 300}


def test_report_text(costs) -> None:
    trace = trace_from_lengths(np.array([100, 300]), np.array([10, 30]), name="two")
    cfg = bundle_config(1, 8, 1, 2048, saturated=True)
    sim = simulate_bundle(costs, trace, cfg, requests=40, saturated=True)
    lines = render_report(sim.report).splitlines()
    assert lines[0].startswith(f"1A1F M=1 B=8: {sim.report.steps} steps, ")
    assert [line.split()[0] for line in lines[1:]] == ["throughput", "idle:", "TTFT", "TPOT", "ITL"]
    with_slo = simulate_bundle(costs, trace, cfg, requests=40, saturated=True, slo=SLOS)
    last = render_report(with_slo.report).splitlines()[-1]
    assert last.startswith(f"SLO attainment {with_slo.report.slo_attainment:.3f}, goodput ")
