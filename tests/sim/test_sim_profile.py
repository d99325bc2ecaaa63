"""`afdserve profile` and `afdserve sim-validate runtime` on a tiny model (small grids).

Timing decides nothing here (the machine is shared and noisy): the tests check that the
pipeline runs on the runtime's own parts and that what it reports follows from what it measured
(each fit's quality from its stored points, each worker-process coefficient from its points and
the in-process fits, each simulation from the coefficients it names). The measured gaps belong
in benchmarks/bench_sim_vs_runtime.py. Both verbs also run once as commands.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from afdserve.calibration.fit_workers import worker_extras
from afdserve.calibration.grid import SMALL_GRID
from afdserve.calibration.profile import check_profile, run_profile
from afdserve.calibration.validate_runtime import (
    WORKER_EXTRAS,
    RuntimeRun,
    Workload,
    validate_runtime,
)
from afdserve.cli import main
from afdserve.errors import UserInputError
from afdserve.planner import StageCosts, WorkloadStats, plan
from afdserve.sim import SimCosts
from afdserve.sim.fit import AffineFit, fit_affine, quality

pytest.importorskip("torch")  # the calibration imports it when it runs

TINY = "builtin:tiny-llama"


def _fit(d: dict) -> AffineFit:
    return AffineFit(d["alpha"], d["beta"], 1.0, 0.0, 0)


def _describes(entry: dict, x: np.ndarray, t: np.ndarray) -> None:
    """The R^2 and worst relative error reported are those of the reported line on the points."""
    r2, err = quality(t, entry["alpha"] * x + entry["beta"])
    assert entry["r2"] == pytest.approx(r2) and entry["max_rel_err"] == pytest.approx(err)


@pytest.fixture(scope="module")
def profile() -> dict:
    data = run_profile(TINY, grid=SMALL_GRID, threads=1, transports=("local", "copy"))
    check_profile(data)
    return data


def test_a_profile_is_fitted_from_the_points_it_stores(profile) -> None:
    d = profile
    assert d["source"] == "measured" and d["units"] == "ms"
    assert d["num_layers"] == 2 and d["torch_threads"] == 1
    assert set(d["transport"]) == {"local", "copy"} and d["comm_transport"] == "local"
    pts = d["points"]
    assert len(pts["attention_decode"]) == 4  # 2 batches x 2 contexts
    assert len(pts["attention_prefill"]) == 8  # 2 sequences x 2 chunks x 2 starts
    a = np.asarray(pts["attention_decode"], dtype=np.float64)  # batch, context, tokens read, ms
    fit = fit_affine(a[:, 2], a[:, 3])
    assert (d["attention"]["alpha"], d["attention"]["beta"]) == (fit.alpha, fit.beta)
    _describes(d["attention"], a[:, 2], a[:, 3])
    f = np.asarray(pts["ffn"], dtype=np.float64)  # tokens, ms
    _describes(d["ffn"], f[:, 0], f[:, 1])
    c = np.asarray(d["transport"]["local"]["points"], dtype=np.float64)  # tokens, ms one way
    _describes(d["comm"], c[:, 0], c[:, 1])
    assert {k: d["comm"][k] for k in ("alpha", "beta")} == {
        k: d["transport"]["local"][k] for k in ("alpha", "beta")
    }
    # the per-step cost is what an engine step takes beyond its layers
    g = np.asarray(pts["engine_step_aggregated"], dtype=np.float64)  # sequences, context, ms
    n, ctx, L = g[:, 0], g[:, 1], d["num_layers"]
    layers = L * (_fit(d["attention"]).predict(n * ctx) + _fit(d["ffn"]).predict(n))
    step = fit_affine(n, np.maximum(g[:, 2] - layers, 1e-6))
    assert (d["step"]["alpha"], d["step"]["beta"]) == pytest.approx((step.alpha, step.beta))


def test_the_planner_and_the_simulator_read_a_profile(profile) -> None:
    costs = StageCosts.from_profile_dict(profile)
    assert costs.num_layers == 2 and costs.source == "measured"
    sim = SimCosts.from_profile_dict(profile)
    assert sim.step_beta_ms == profile["step"]["beta"]
    assert sim.prefill_token_ms == profile["prefill"]["token_ms"]
    assert plan(costs, 8, WorkloadStats(100.0)).costs.num_layers == 2


def test_profile_command(tmp_path, capsys) -> None:
    out = tmp_path / "profile.json"
    code = main(
        [
            *("profile", "--model", TINY, "--out", str(out), "--grid", "small"),
            *("--threads", "1", "--transports", "local", "--quiet"),
        ]
    )
    text, err = capsys.readouterr()
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0].startswith(f"{TINY} on cpu") and lines[0].endswith(f"-> {out}")
    assert lines[1].split()[:3] == ["stage", "alpha", "beta"]
    assert [line.split()[0] for line in lines[2:6]] == ["attention", "ffn", "comm", "step"]
    assert lines[-1].startswith("transport local ")
    assert StageCosts.from_profile(out).num_layers == 2  # the file it wrote


def test_profile_rejects_bad_input(tmp_path) -> None:
    for kwargs, needle in (
        ({"transports": ("local", "pigeon")}, "unknown transport"),
        ({"comm_from": "shm", "transports": ("local",)}, "comm-from"),
        ({"threads": 0}, "threads"),
    ):
        with pytest.raises(UserInputError, match=needle):
            run_profile(TINY, grid=SMALL_GRID, **kwargs)
    with pytest.raises(UserInputError, match="does not exist"):
        run_profile("/no/such/model", grid=SMALL_GRID)


SMALL = Workload(4, 8, 6)
"""A CI-sized runtime validation: 4 requests of 8 prompt and 6 output tokens."""


def _runs(transport: str) -> tuple[RuntimeRun, ...]:
    return (
        RuntimeRun("aggregated", 1),
        RuntimeRun("afd", 1, transport=transport),
        RuntimeRun("afd", 2, transport=transport),
    )


def _validate(transport: str = "local", **kwargs):
    return validate_runtime(
        TINY,
        profile_grid=SMALL_GRID,
        runs=_runs(transport),
        workload=SMALL,
        threads=1,
        repeats=1,
        **kwargs,
    )


def test_runtime_validation_compares_each_run_with_its_simulation() -> None:
    v = _validate(profile_rounds=2, rounds=2)
    assert v.rounds == 2 and v.profile["rounds"] == 2
    assert [r.run for r in v.runs] == [
        "aggregated M=1",
        "AFD 1A1F M=1 (local)",
        "AFD 1A1F M=2 (local)",
    ]
    for r in v.runs:
        assert r.output_tokens == 4 * 6
        assert r.real_steps == r.sim_steps == 6  # one prefill step, then 5 decode steps
        assert r.real_step_ms > 0 and r.sim_step_ms > 0
        assert r.real_tokens_per_s > 0 and r.sim_tokens_per_s > 0
        assert r.step_ms_error == pytest.approx(r.sim_step_ms / r.real_step_ms - 1)
        assert r.tokens_per_s_error == pytest.approx(r.sim_tokens_per_s / r.real_tokens_per_s - 1)
        if r.run.startswith("AFD"):
            # no overlap is never faster (up to float rounding)
            assert r.sim_serial_step_ms >= r.sim_step_ms * (1 - 1e-9) > 0
        else:
            assert r.sim_serial_step_ms is None
    with pytest.raises(UserInputError, match="choose one of"):
        RuntimeRun("afd", 1, transport="udp")


def test_sim_validate_runtime_command(capsys) -> None:
    code = main(
        [
            *("sim-validate", "runtime", "--model", TINY, "--grid", "small", "--requests", "4"),
            *("--prompt-len", "8", "--output-len", "6", "--repeats", "1", "--threads", "1"),
            "--quiet",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith("4 requests x (prompt 8, output 6)")
    assert lines[1].split()[:3] == ["run", "real", "ms/step"]
    runs = ["aggregated M=1", "AFD 1A1F M=1 (local)", "AFD 1A1F M=2 (local)"]
    assert [line[:26].rstrip() for line in lines[2:]] == runs


def test_runtime_validation_over_worker_processes() -> None:
    # the AFD runs go through real worker processes over shm; the profile times shm transfers
    v = _validate("shm")
    assert [r.run for r in v.runs] == [
        "aggregated M=1",
        "AFD 1A1F M=1 (shm)",
        "AFD 1A1F M=2 (shm)",
    ]
    # the profile timed decode steps of real worker processes over shm, one point per grid N,
    # and the AFD runs are simulated with the per-step extra fitted from them, not the
    # in-process one
    shm = v.profile["transport"]["shm"]
    assert [p[0] for p in shm["worker_step_points"]] == [1, 4]  # SMALL_GRID.step_batches
    assert all(p[2] > 0 for p in shm["worker_step_points"])
    # and prefill steps: S in SMALL_GRID.prefill_sequences prompts of its longest chunk
    assert [p[:2] for p in shm["worker_prefill_points"]] == [[1, 32], [4, 32]]
    assert all(p[2] > 0 for p in shm["worker_prefill_points"])
    # and decode steps of an M = 2 engine: what a second microbatch costs
    assert [p[0] for p in shm["worker_step_points_m2"]] == [1, 4]
    # each coefficient is the fit of those points against the profile's in-process fits
    refit = worker_extras(
        v.profile,
        "shm",
        shm["worker_step_points"],
        shm["worker_prefill_points"],
        shm["worker_step_points_m2"],
    )
    assert {k: shm[k] for k in WORKER_EXTRAS} == pytest.approx({k: refit[k] for k in WORKER_EXTRAS})
    in_process_alpha = v.profile["step"]["alpha"]
    in_process_prefill = v.profile["step"]["prefill_token_ms"]
    for r in v.runs:
        if r.run.startswith("AFD"):
            assert r.sim_afd_step_ms == shm["afd_beta"]
            assert r.sim_step_alpha_ms == pytest.approx(in_process_alpha + shm["afd_alpha"])
            assert r.sim_step_prefill_token_ms == pytest.approx(
                in_process_prefill + shm["afd_prefill_token_ms"]
            )
            assert r.sim_afd_microbatch_ms == shm["afd_microbatch_ms"]
        else:
            assert r.sim_afd_step_ms is None
            assert r.sim_step_alpha_ms == in_process_alpha
            assert r.sim_step_prefill_token_ms == in_process_prefill
    for r in v.runs:
        assert r.output_tokens == 4 * 6
        assert r.sim_steps == 6
        # a worker process may start stepping before the last of the 4 requests reaches it
        # over the control plane: each request that arrives after a step began prefills in a
        # step of its own, so up to 3 extra steps (seen: 8 on a loaded 2-core machine)
        assert 6 <= r.real_steps <= 9
        assert math.isfinite(r.step_ms_error) and r.real_step_ms > 0
    # what `--json` writes of it: the worker-process coefficients, without the raw transports
    d = json.loads(json.dumps(v.to_dict()))
    assert "transport" not in d["profile"]
    assert d["profile"]["worker_steps"]["shm"]["afd_beta"] == shm["afd_beta"]


def test_runtime_validation_interleaves_worker_process_timing_with_the_runs() -> None:
    v = _validate("shm", interleave=True, rounds=2)
    rounds = v.interleaved["shm"]  # re-timed before each round's worker-process runs
    assert len(rounds) == 2
    assert all(set(e) == set(WORKER_EXTRAS) for e in rounds)
    prefill = v.profile["step"]["prefill_token_ms"]

    def median(key: str) -> float:
        return float(np.median([e[key] for e in rounds]))

    for r in v.runs:
        if r.run.startswith("AFD"):  # simulated with each coefficient's median over rounds
            assert r.sim_afd_step_ms == pytest.approx(median("afd_beta"))
            assert r.sim_step_prefill_token_ms == pytest.approx(
                prefill + median("afd_prefill_token_ms")
            )
            assert r.sim_afd_microbatch_ms == pytest.approx(median("afd_microbatch_ms"))
            assert r.sim_afd_step_ms != v.profile["transport"]["shm"]["afd_beta"]
        else:
            assert r.sim_afd_step_ms is None


def test_worker_afd_fit_is_a_robust_line_through_the_residuals() -> None:
    from afdserve.calibration.fit_workers import _worker_afd_fit

    attn = AffineFit(0.001, 0.5, 1.0, 0.0, 3)  # ms per context token read, ms
    ffn = AffineFit(0.01, 0.2, 1.0, 0.0, 3)
    step = AffineFit(0.05, 1.0, 1.0, 0.0, 3)
    comm = {"alpha": 0.002, "beta": 0.1}
    L = 2

    def predicted(n: int, ctx: float) -> float:
        layers = L * (0.001 * n * ctx + 0.5 + 0.01 * n + 0.2)
        return layers + 0.05 * n + 1.0 + 2 * L * (0.002 * n + 0.1)

    ns = (1, 4, 8, 16, 32)
    extra = {n: 1.5 + 0.03 * n for n in ns}
    extra[16] += 4.0  # one disturbed point does not tilt the line
    pts = [(n, 40.0, predicted(n, 40.0) + extra[n]) for n in ns]
    alpha, beta = _worker_afd_fit(pts, L, attn, ffn, step, comm)
    assert alpha == pytest.approx(0.03) and beta == pytest.approx(1.5)
    # faster than the in-process prediction (it cannot be, but noise): clipped at 0
    pts = [(n, 40.0, predicted(n, 40.0) - 0.3) for n in (1, 8)]
    assert _worker_afd_fit(pts, L, attn, ffn, step, comm) == (0.0, 0.0)
    # a falling residual is no negative cost per sequence: flat, at its median
    pts = [(n, 40.0, predicted(n, 40.0) + 2.0 - 0.01 * n) for n in (1, 8, 32)]
    alpha, beta = _worker_afd_fit(pts, L, attn, ffn, step, comm)
    assert alpha == 0.0 and beta == pytest.approx(2.0 - 0.08)


def test_worker_process_runs_combine_to_the_median_and_in_process_to_the_fastest() -> None:
    from afdserve.calibration.validate_runtime import _combine

    def run(step_ms_each: list[float]) -> dict:
        return {
            "steps": 10,
            "tokens": 40,
            "step_ms": min(step_ms_each),
            "wall_s": min(step_ms_each) * 10 / 1e3,
            "tokens_per_s": 40 / (min(step_ms_each) * 10 / 1e3),
            "step_ms_each": step_ms_each,
        }

    rounds = [run([5.0, 9.0, 6.0]), run([2.0, 7.0, 8.0])]
    assert _combine(rounds, typical=False)["step_ms"] == 2.0
    typical = _combine(rounds, typical=True)
    assert typical["step_ms"] == pytest.approx(6.5)  # median of all six repeats
    assert typical["tokens_per_s"] == pytest.approx(40 / (6.5 * 10 / 1e3))


def test_worker_prefill_fit_recovers_the_per_token_extra() -> None:
    from afdserve.calibration.fit_workers import _worker_prefill_fit

    attn = AffineFit(0.001, 0.5, 1.0, 0.0, 3)
    ffn = AffineFit(0.01, 0.2, 1.0, 0.0, 3)
    step = AffineFit(0.05, 1.0, 1.0, 0.0, 3)
    prefill = {"token_ms": 0.002, "pair_ms": 1e-5}
    comm = {"alpha": 0.002, "beta": 0.1}
    L, tok_ms, afd_alpha, afd_beta = 2, 0.004, 0.03, 1.5

    def predicted(s: int, n: int) -> float:
        t = s * n
        attention = 0.001 * t + 0.5 + 0.002 * t + 1e-5 * s * n * (n + 1) / 2
        return (L * (attention + 0.01 * t + 0.2) + 0.05 * s + 1.0 + tok_ms * t
                + 2 * L * (0.002 * t + 0.1) + afd_alpha * s + afd_beta)  # fmt: skip

    args = (L, attn, prefill, ffn, step, tok_ms, comm, afd_alpha, afd_beta)
    pts = [(s, 256, predicted(s, 256) + 0.007 * s * 256) for s in (1, 8, 16)]
    assert _worker_prefill_fit(pts, *args) == pytest.approx(0.007)
    pts[1] = (8, 256, pts[1][2] + 50.0)  # one disturbed point moves the median little
    assert _worker_prefill_fit(pts, *args) == pytest.approx(0.007)
    # no slower than in-process (noise): 0, never negative
    assert _worker_prefill_fit([(4, 64, predicted(4, 64) - 1.0)], *args) == 0.0
    assert _worker_prefill_fit([], *args) == 0.0


def test_pin_workers_reaches_worker_process_runs_only() -> None:
    from afdserve.calibration.validate_runtime import _engine_options

    w = Workload(4, 8, 4)
    assert _engine_options(RuntimeRun("afd", 1, transport="shm"), w, "cpu", "auto", True)[
        "pin_workers"
    ]
    assert not _engine_options(RuntimeRun("afd", 1), w, "cpu", "auto", True)["pin_workers"]
    assert not _engine_options(RuntimeRun("afd", 1, transport="shm"), w, "cpu", "auto")[
        "pin_workers"
    ]


def test_worker_microbatch_fit_is_what_a_second_microbatch_adds_beyond_the_simulator() -> None:
    from afdserve.calibration.fit_workers import _worker_microbatch_fit, costs_for_transport
    from afdserve.sim.pipeline import time_one_step

    profile = SimCosts.explicit(
        1e-4, 0.3, 2e-3, 0.2, 1e-3, 0.01, num_layers=2, step_beta_ms=0.5
    ).to_profile_dict()
    profile["comm_transport"] = "local"
    profile["transport"] = {"shm": {"alpha": 2e-3, "beta": 0.1, "afd_beta": 0.4, "afd_alpha": 0}}
    costs = costs_for_transport(profile, "shm")

    def sim(n: int, ctx: float, m: int) -> float:
        parts = [n // m + (1 if i < n % m else 0) for i in range(m)]
        return time_one_step(
            costs, "microbatch", [parts], [[p * ctx for p in parts]], [[0] * m], [[0] * m], [n]
        )[0]

    ns, ctx = (1, 8, 16, 32), 70.0
    pts1 = [(n, ctx, sim(n, ctx, 1) + 1.0) for n in ns]  # M=1: off by 1 ms (cancels)
    pts2 = [(n, ctx, sim(n, ctx, 2) + 1.0 + (0.0 if n == 1 else 0.8)) for n in ns]
    assert _worker_microbatch_fit(pts1, pts2, profile, "shm") == pytest.approx(0.8)
    pts2 = [(n, ctx, sim(n, ctx, 2) + 0.5) for n in ns]  # cheaper than simulated: 0
    assert _worker_microbatch_fit(pts1, pts2, profile, "shm") == 0.0
