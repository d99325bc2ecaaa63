"""Step timing: the exact microbatch pipeline, its limits, and the scalar path against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from afdserve.sim import SimCosts, StepLoad, decode_load, stage_times, step_timing
from afdserve.sim.pipeline import time_one_step


def _one_worker_load(tokens: int, context: int, groups: int, workers: int = 1) -> StepLoad:
    nd = np.full((1, workers), tokens)
    ctx = np.full((1, workers), context)
    return decode_load(nd, ctx, groups)


@pytest.mark.parametrize("scales", ["B", "rB"])
@pytest.mark.parametrize("workers", [1, 3])
def test_one_microbatch_is_the_unpipelined_sum(scales: str, workers: int) -> None:
    L = 7
    c = SimCosts.explicit(
        2e-4,
        0.3,
        3e-3,
        0.5,
        1e-3,
        0.05,
        num_layers=L,
        comm_scales_with=scales,
        step_alpha_ms=0.01,
        step_beta_ms=0.2,
    )
    load = _one_worker_load(64, 64 * 500, 1, workers)
    d = step_timing(stage_times(c, load, "microbatch"), L, "microbatch").duration[0]
    a = 2e-4 * 64 * 500 + 0.3
    f = 3e-3 * 64 * workers + 0.5
    link = 1e-3 * 64 * (workers if scales == "rB" else 1) + 0.05
    post = 0.01 * 64 + 0.2
    assert d == pytest.approx(L * (a + 2 * link + f) + post, rel=1e-12)


def test_many_microbatches_approach_the_max_of_stages() -> None:
    """No fixed costs: with M microbatches the step tends to L * max(stage loads)."""
    L = 16
    c = SimCosts.explicit(1e-4, 0.0, 2e-3, 0.0, 5e-4, 0.0, num_layers=L)
    nd = np.array([[512, 512]])
    ctx = np.array([[512 * 1000, 512 * 900]])
    cycle = L * max(1e-4 * 512 * 1000, 2e-3 * 1024, 5e-4 * 512)
    total = L * (1e-4 * 512 * 1000 + 2e-3 * 1024 + 2 * 5e-4 * 512)
    prev = None
    for M in (1, 2, 4, 16, 64, 256):
        d = step_timing(stage_times(c, decode_load(nd, ctx, M), "microbatch"), L, "microbatch")
        t = d.duration[0]
        assert cycle - 1e-9 <= t <= total + 1e-9
        if prev is not None:
            assert t <= prev + 1e-9  # more microbatches never hurt without fixed costs
        prev = t
    assert prev == pytest.approx(cycle, rel=2e-3)
    assert prev > cycle  # the pipeline still fills and drains once a step


def test_fixed_costs_make_more_microbatches_slower() -> None:
    L = 4
    c = SimCosts.explicit(1e-6, 1.0, 1e-5, 1.0, 0.0, 0.0, num_layers=L)
    nd, ctx = np.array([[8]]), np.array([[800]])
    t = [
        step_timing(
            stage_times(c, decode_load(nd, ctx, m), "microbatch"), L, "microbatch"
        ).duration[0]
        for m in (1, 2, 4)
    ]
    assert t[0] < t[1] < t[2]


def test_ideal_and_colocated_formulas() -> None:
    L = 3
    c = SimCosts.explicit(1e-4, 0.2, 1e-3, 0.4, 1e-3, 0.1, num_layers=L)
    nd = np.array([[10, 20]])
    ctx = np.array([[10_000, 30_000]])
    ideal = step_timing(stage_times(c, decode_load(nd, ctx, 1), "ideal"), L, "ideal")
    a = max(1e-4 * 10_000, 1e-4 * 30_000) + 0.2
    f = 1e-3 * 30 + 0.4
    link = 1e-3 * 20 + 0.1
    assert ideal.duration[0] == pytest.approx(L * max(a, f, link))
    one = decode_load(np.array([[10]]), np.array([[10_000]]), 2)
    col = step_timing(stage_times(c, one, "colocated"), L, "colocated")
    # colocated: attention then FFN of each microbatch, no transfers
    per_mb = [1e-4 * 5000 + 0.2 + 1e-3 * 5 + 0.4] * 2
    assert col.duration[0] == pytest.approx(L * sum(per_mb))


def test_empty_microbatches_cost_nothing_and_do_not_wait() -> None:
    """A worker with no tokens neither delays the FFN nor the step."""
    L = 5
    c = SimCosts.explicit(1e-4, 0.3, 1e-3, 0.5, 1e-3, 0.1, num_layers=L)
    busy = decode_load(np.array([[16, 0]]), np.array([[16 * 100, 0]]), 2)
    alone = decode_load(np.array([[16]]), np.array([[16 * 100]]), 2)
    t_busy = step_timing(stage_times(c, busy, "microbatch"), L, "microbatch").duration[0]
    t_alone = step_timing(stage_times(c, alone, "microbatch"), L, "microbatch").duration[0]
    assert t_busy == pytest.approx(t_alone)


def test_scalar_path_equals_vectorised() -> None:
    rng = np.random.default_rng(7)
    for trial in range(300):
        r, G, L = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 30))
        c = SimCosts.explicit(
            *(rng.random(6) * [1e-3, 1, 1e-2, 1, 1e-2, 0.5]),
            num_layers=L,
            comm_scales_with="rB" if trial % 4 == 0 else "B",
            prefill_token_ms=rng.random() * 1e-2,
            prefill_pair_ms=rng.random() * 1e-5,
            step_alpha_ms=rng.random() * 0.1,
            step_beta_ms=rng.random(),
            afd_step_ms=rng.random(),
            step_prefill_token_ms=rng.random() * 1e-3,
        )
        tok = rng.integers(0, 5, size=(1, r, G)) * (rng.random((1, r, G)) < 0.8)
        ctx = tok * rng.integers(1, 3000, size=(1, r, G))
        pt = np.minimum(tok, rng.integers(0, 3, size=(1, r, G)))
        load = StepLoad(
            tok.astype(float), ctx.astype(float), pt.astype(float), pt * 100.0, tok.sum(2) * 1.0
        )
        pipes = ["microbatch", "ideal", "serial"] + (["colocated"] if r == 1 else [])
        pipe = pipes[trial % len(pipes)]
        ref = step_timing(stage_times(c, load, pipe), L, pipe)
        d, att, ffn, link = time_one_step(
            c,
            pipe,
            *(
                x[0].tolist()
                for x in (
                    load.tokens,
                    load.context,
                    load.prefill_tokens,
                    load.prefill_pairs,
                    load.sampled,
                )
            ),
        )
        assert d == pytest.approx(ref.duration[0], rel=1e-12, abs=1e-12)
        assert att == pytest.approx(ref.attention_busy[0].tolist(), rel=1e-12, abs=1e-12)
        assert ffn == pytest.approx(ref.ffn_busy[0], rel=1e-12, abs=1e-12)
        assert link == pytest.approx(ref.link_busy[0], rel=1e-12, abs=1e-12)


def test_periodic_extrapolation_matches_running_every_layer() -> None:
    """The early exit (uniform shift => extrapolate) equals iterating all L layers."""
    from afdserve.sim import pipeline

    rng = np.random.default_rng(3)
    c = SimCosts.explicit(3e-5, 0.2, 1e-3, 0.3, 2e-3, 0.05, num_layers=40)
    nd = rng.integers(1, 64, size=(50, 4))
    ctx = nd * rng.integers(100, 4000, size=(50, 4))
    st = stage_times(c, decode_load(nd, ctx, 3), "microbatch")
    fast = pipeline.microbatch_makespan(st, 40)
    old = pipeline._REL_TOL
    try:
        pipeline._REL_TOL = -1.0  # never periodic: run every layer
        slow = pipeline.microbatch_makespan(st, 40)
    finally:
        pipeline._REL_TOL = old
    np.testing.assert_allclose(fast, slow, rtol=1e-10)


def test_serial_is_every_job_in_a_row() -> None:
    L = 3
    c = SimCosts.explicit(1e-4, 0.2, 1e-3, 0.4, 1e-3, 0.1, num_layers=L, step_beta_ms=0.5)
    load = decode_load(np.array([[10, 20]]), np.array([[10_000, 30_000]]), 2)
    t = step_timing(stage_times(c, load, "serial"), L, "serial").duration[0]
    attn = 1e-4 * 40_000 + 4 * 0.2  # two workers x two microbatches
    ffn = 1e-3 * 30 + 2 * 0.4
    links = 2 * (1e-3 * 30 + 4 * 0.1)
    assert t == pytest.approx(L * (attn + ffn + links) + 2 * 0.5)
    pipelined = step_timing(stage_times(c, load, "microbatch"), L, "microbatch").duration[0]
    assert pipelined < t


@pytest.mark.parametrize("pipeline", ["microbatch", "serial", "colocated"])
def test_afd_microbatch_ms_costs_each_microbatch_beyond_the_first(pipeline: str) -> None:
    import dataclasses

    L = 3
    base = SimCosts.explicit(2e-4, 0.3, 3e-3, 0.5, 1e-3, 0.05, num_layers=L, step_beta_ms=0.2)
    extra = dataclasses.replace(base, afd_microbatch_ms=0.7)
    for M, busy in ((1, 1), (2, 2), (3, 3), (3, 2)):
        tokens = [[16.0] * busy + [0.0] * (M - busy)]  # one worker, `busy` non-empty microbatches
        args = (tokens, [[16.0 * 300] * M], [[0.0] * M], [[0.0] * M], [16.0 * busy])
        d0 = time_one_step(base, pipeline, *args)[0]
        d1 = time_one_step(extra, pipeline, *args)[0]
        want = 0.0 if pipeline == "colocated" else 0.7 * (busy - 1)
        assert d1 - d0 == pytest.approx(want, abs=1e-9)
        nd = np.array([[16 * busy]])
        load = decode_load(nd, np.array([[16 * busy * 300]]), busy)
        v0 = step_timing(stage_times(base, load, pipeline), L, pipeline).duration[0]
        v1 = step_timing(stage_times(extra, load, pipeline), L, pipeline).duration[0]
        assert v1 - v0 == pytest.approx(want, abs=1e-9)  # the vectorised path agrees
