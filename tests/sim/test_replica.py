"""The reference replica (the runtime's scheduler and microbatch split, timed by the simulator's
cost model) on its own, and the fast step engine checked against it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from afdserve.engine.microbatch import split_microbatches
from afdserve.errors import UserInputError
from afdserve.planner import parse_distribution
from afdserve.sim import (
    BundleConfig,
    RequestSet,
    SimCosts,
    closed_loop,
    from_distributions,
    run_unit,
    simulate,
    summarize,
)
from afdserve.sim.plan_load import plan_load
from afdserve.sim.replica import ReferenceReplica, simulate_reference
from afdserve.types import SamplingParams, ScheduledChunk

COSTS = SimCosts.explicit(
    2e-4,  # attention: ms per context token and layer
    0.05,
    1e-2,  # FFN: ms per token and layer: at r = 2 about what a worker's attention costs
    0.2,
    1e-4,  # links
    0.02,
    num_layers=4,
    prefill_token_ms=5e-4,
    prefill_pair_ms=1e-7,
    step_alpha_ms=0.01,
    step_beta_ms=0.1,
)
MIXES = {
    "decode": ("uniform:16:128", "uniform:64:256"),  # short prompts, long outputs
    "prefill": ("uniform:400:1600", "uniform:4:32"),  # long prompts chunked, few outputs
    "tiny-prompt": ("uniform:1:16", "uniform:32:256"),
}
SHAPES = {  # slots and token budget per mix
    "decode": {"slots": 32},
    "prefill": {"slots": 16, "token_budget": 1024},
    "tiny-prompt": {"slots": 32},
}


def _requests(mix: str, n: int, rate: float | None, seed: int = 0) -> RequestSet:
    """n requests of a mix, Poisson at `rate` requests/s (about 70% of what the bundle serves
    flat out, so queues form and drain) or all at time 0."""
    prompt, output = (parse_distribution(s) for s in MIXES[mix])
    arrivals = "offline" if rate is None else "poisson"
    return from_distributions(prompt, output, n, arrivals=arrivals, rate=rate, seed=seed)


def _config(mix: str, r: int, m: int, **kw) -> BundleConfig:
    return BundleConfig(attention_workers=r, microbatches=m, **SHAPES[mix], **kw)


# ---- the replica on its own -----------------------------------------------------------------


def test_every_request_gets_exactly_its_output_tokens() -> None:
    reqs = _requests("decode", 60, 40.0, seed=3)
    replica = ReferenceReplica(COSTS, _config("decode", 2, 2), reqs)
    run = replica.run()
    np.testing.assert_array_equal(replica.generated, reqs.output_len)
    assert int(run.tokens_out.sum()) == reqs.output_tokens
    assert int(run.prefill_tokens.sum()) == int(reqs.prompt_len.sum())  # nothing recomputed
    assert sum(s.counters.requests_finished for s in replica.schedulers) == len(reqs)
    assert all(s.counters.requests_added > 0 for s in replica.schedulers)  # both workers served
    assert np.all(run.first_token >= run.arrival) and np.all(run.finish >= run.first_token)
    assert np.all(run.step_start[1:] >= run.step_start[:-1] + run.step_duration[:-1] - 1e-9)
    rep = summarize([run])
    assert rep.requests_finished == len(reqs) and rep.unfinished == 0


def test_a_small_kv_cache_preempts_and_recomputes_yet_every_request_completes() -> None:
    reqs = _requests("decode", 40, None, seed=1)
    cfg = _config("decode", 1, 1, kv_capacity_tokens=1200)
    replica = ReferenceReplica(COSTS, cfg, reqs, block_size=16)
    run = replica.run()
    counters = replica.schedulers[0].counters
    assert counters.preemptions > 0 and counters.recomputed_tokens > 0
    np.testing.assert_array_equal(replica.generated, reqs.output_len)
    # every token fed is new (prompts, and every output but the last) or recomputed
    fed = int(run.prefill_tokens.sum() + run.decode_slots.sum())
    new = int(reqs.prompt_len.sum()) + reqs.output_tokens - len(reqs)
    assert fed == new + counters.recomputed_tokens


def test_an_idle_bundle_waits_for_the_next_arrival() -> None:
    reqs = RequestSet(np.array([100, 100]), np.array([5, 5]), np.array([0.0, 10.0]))
    run = simulate_reference(COSTS, _config("decode", 1, 1), reqs)
    second = int(np.searchsorted(run.step_start, 10_000.0))
    assert run.step_start[second] == 10_000.0  # the step starts on the arrival, not before
    ttft = run.first_token - run.arrival
    assert ttft[0] == pytest.approx(ttft[1]) and ttft[0] == run.step_duration[0]


def _chunk(seq_id: int, start: int, n: int, outputs: int) -> ScheduledChunk:
    return ScheduledChunk(
        seq_id=seq_id,
        token_ids=(0,) * n,
        start_pos=start,
        block_table=(),
        sample=True,
        params=SamplingParams(),
        sampling_seed=0,
        output_index=outputs,
    )


def test_a_step_is_priced_as_the_runtime_splits_it() -> None:
    """Three decodes, then the last chunk of a prompt (the scheduler's order): the runtime's
    contiguous split cannot give that chunk a microbatch of its own, since it is more than half
    of the step, so the step is one microbatch; put first, it would get its own."""
    decodes = [_chunk(0, 99, 1, 3), _chunk(1, 199, 1, 1), _chunk(2, 299, 1, 7)]
    prefill = _chunk(3, 20, 30, 0)
    load = plan_load([split_microbatches([*decodes, prefill], 2)], 2)
    assert load.tokens == [[33.0, 0.0]]
    assert load.context == [[100 + 200 + 300 + 50.0, 0.0]]
    assert load.prefill_tokens == [[30.0, 0.0]] and load.pairs == [[30 * 20 + 30 * 31 / 2, 0.0]]
    assert load.sampled == [4.0] and load.itl_tokens == 3
    assert (load.decode_slots, load.decode_context, load.prefill_total) == (3, 600, 30)
    first = plan_load([split_microbatches([prefill, *decodes], 2)], 2)
    assert first.tokens == [[30.0, 3.0]]
    one_token_prompt = plan_load([[[_chunk(4, 0, 1, 0)]]], 1)  # feeds its prompt: prefill
    assert one_token_prompt.decode_slots == 0 and one_token_prompt.prefill_total == 1


def test_what_the_replica_cannot_serve_is_refused() -> None:
    reqs = _requests("decode", 10, None)
    with pytest.raises(UserInputError, match="always prefills"):
        ReferenceReplica(COSTS, _config("decode", 1, 1, prefill="none"), reqs)
    warm = closed_loop(np.full(4, 50), np.full(4, 20), num_slots=2, num_requests=8)
    with pytest.raises(UserInputError, match="stationary start"):
        ReferenceReplica(COSTS, _config("decode", 1, 1), warm)
    with pytest.raises(UserInputError, match="needs .* KV tokens"):
        ReferenceReplica(COSTS, _config("decode", 1, 1, kv_capacity_tokens=128), reqs)


def test_run_unit_runs_either_engine() -> None:
    reqs = _requests("decode", 20, 30.0)
    cfg = _config("decode", 2, 1)
    via_unit = run_unit(COSTS, cfg, reqs, engine="reference")
    direct = simulate_reference(COSTS, cfg, reqs)
    np.testing.assert_array_equal(via_unit.finish, direct.finish)
    np.testing.assert_array_equal(
        run_unit(COSTS, cfg, reqs).finish, simulate(COSTS, cfg, reqs).finish
    )
    with pytest.raises(UserInputError, match="engine must be one of"):
        run_unit(COSTS, cfg, reqs, engine="vidur")
    with pytest.raises(UserInputError, match="no closed loop"):
        run_unit(COSTS, cfg, reqs, engine="reference", closed_loop=True)


# ---- the fast engine against the reference ----------------------------------------------------


@pytest.mark.parametrize(
    "mix,rate,pipeline",
    [
        ("decode", 17.0, "microbatch"),
        ("prefill", 11.0, "microbatch"),
        ("prefill", 11.0, "ideal"),
        ("prefill", 11.0, "serial"),
        ("prefill", 11.0, "colocated"),
    ],
)
def test_one_worker_one_microbatch_is_the_scheduler_exactly(
    mix: str, rate: float, pipeline: str
) -> None:
    """r = 1, M = 1: the fast engine's admission, chunked prefill and completions are the
    scheduler's, step for step, so every request's times agree to rounding."""
    reqs = _requests(mix, 100, rate, seed=2)
    cfg = _config(mix, 1, 1, pipeline=pipeline)
    fast, ref = simulate(COSTS, cfg, reqs), simulate_reference(COSTS, cfg, reqs)
    assert fast.num_steps == ref.num_steps
    for field in ("first_token", "finish", "step_duration"):
        np.testing.assert_allclose(getattr(fast, field), getattr(ref, field), rtol=1e-9)
    for field in ("tokens_out", "decode_slots", "decode_context", "prefill_tokens"):
        np.testing.assert_array_equal(getattr(fast, field), getattr(ref, field))


@dataclass(frozen=True)
class Tolerance:
    """Relative tolerances on throughput, mean TTFT and mean TPOT, and why they are what they
    are (the gaps measured over seeds 0-4 of each case, for the cost model above; the test runs
    seed 0)."""

    throughput: float
    ttft: float
    tpot: float
    why: str


ROUTING = Tolerance(
    0.02,
    0.05,
    0.05,
    "r = 2, M = 1: only routing differs. The fast engine keeps one queue for the bundle and "
    "places a request on the worker with the most free slots when it is admitted; the runtime "
    "routes it on arrival to the worker with the least KV + queued tokens, where it waits behind "
    "that worker's own queue. Measured: throughput within 0.6%, mean TTFT within 3.3%, mean "
    "TPOT within 3.5%.",
)
ONE_WAVE = Tolerance(
    0.02,
    0.01,
    0.01,
    "M = 2, one wave of requests admitted together (no more than the slots): a step's decodes "
    "have near-equal contexts, so the runtime's contiguous split and the fast engine's even "
    "split give the same microbatches. Measured: TTFT and TPOT within 0.6%, throughput within "
    "1.1% (r = 2: the run's tail depends on how the router spread the wave).",
)
SPLIT_GAP = (
    "M = 2 with arrivals: the runtime's contiguous split (split_microbatches) keeps a prefill "
    "chunk, which comes last in the plan, with the decodes before it whenever it is more than "
    "half of the step, and gives the oldest decodes (the longest contexts) to the first "
    "microbatch; the fast engine gives every chunk a microbatch of its own and spreads decode "
    "context evenly, so it overlaps more and is optimistic: mean TTFT 4-40% and mean TPOT 7-47% "
    "below the reference's. With prefill chunks put first in the plan, 6% and 11% remain (the "
    "uneven decode contexts)."
)
KV_GAP = (
    "KV-bound: the fast engine reserves prompt + output at admission and never preempts; the "
    "scheduler allocates blocks as it goes, admits more and preempts by recompute. The fast "
    "engine's mean TPOT comes out 35-39% below the reference's and its mean TTFT 9-12% above "
    "(throughput agrees within 1.1%)."
)


def _known_gap(why: str):
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=why)


@pytest.mark.parametrize(
    "mix,r,m,n,rate,kv,tol",
    [
        pytest.param("decode", 2, 1, 160, 27.0, None, ROUTING, id="decode-r2-M1"),
        pytest.param("prefill", 2, 1, 120, 13.0, None, ROUTING, id="prefill-r2-M1"),
        pytest.param("tiny-prompt", 1, 2, 32, None, None, ONE_WAVE, id="one-wave-r1-M2"),
        pytest.param("tiny-prompt", 2, 2, 48, None, None, ONE_WAVE, id="one-wave-r2-M2"),
        pytest.param(
            "decode", 2, 2, 160, 38.0, None, ROUTING, id="decode-r2-M2", marks=_known_gap(SPLIT_GAP)
        ),
        pytest.param(
            "prefill",
            1,
            2,
            100,
            14.0,
            None,
            ROUTING,
            id="prefill-r1-M2",
            marks=_known_gap(SPLIT_GAP),
        ),
        pytest.param(
            "decode", 1, 1, 100, None, 3000, ROUTING, id="kv-bound-r1-M1", marks=_known_gap(KV_GAP)
        ),
    ],
)
def test_the_fast_engine_agrees_with_the_reference(
    mix: str, r: int, m: int, n: int, rate: float | None, kv: int | None, tol: Tolerance
) -> None:
    reqs = _requests(mix, n, rate, seed=0)
    cfg = _config(mix, r, m, kv_capacity_tokens=kv)
    fast = summarize([simulate(COSTS, cfg, reqs)])
    ref = summarize([simulate_reference(COSTS, cfg, reqs)])
    assert fast.requests_finished == ref.requests_finished == n
    assert fast.output_tokens == ref.output_tokens == reqs.output_tokens
    off = [
        f"{what}: fast {a:.4g} vs reference {b:.4g} ({a / b - 1:+.1%}, tolerance {rel:.0%})"
        for what, a, b, rel in (
            ("throughput", fast.throughput_tok_s, ref.throughput_tok_s, tol.throughput),
            ("mean TTFT", fast.ttft_ms.mean, ref.ttft_ms.mean, tol.ttft),
            ("mean TPOT", fast.tpot_ms.mean, ref.tpot_ms.mean, tol.tpot),
        )
        if abs(a / b - 1) > rel
    ]
    assert not off, "; ".join(off) + f" [{tol.why}]"
