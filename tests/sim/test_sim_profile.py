"""`afdserve profile` and `afdserve sim-validate runtime` on a tiny model (small grids).

Timing decides nothing here (the machine is shared and noisy): the tests check that the
pipeline runs on the runtime's own parts and produces well-formed, readable results. The
measured gaps belong in benchmarks/bench_sim_vs_runtime.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from afdserve.cli import main
from afdserve.planner import StageCosts
from afdserve.sim import SimCosts

pytest.importorskip("torch")


def _finite_fit(entry: dict) -> None:
    assert entry["alpha"] >= 0 and entry["beta"] >= 0
    assert math.isfinite(entry["r2"]) and entry["max_rel_err"] >= 0


def test_profile_command_writes_a_profile_the_planner_and_simulator_read(tmp_path, capsys) -> None:
    out = tmp_path / "profile.json"
    code = main(
        [
            "profile",
            "--model",
            "builtin:tiny-llama",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--grid",
            "small",
            "--threads",
            "1",
            "--transports",
            "local,copy",
            "--quiet",
        ]
    )
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "attention" in text and "R^2" in text
    data = json.loads(out.read_text())
    assert data["source"] == "measured" and data["units"] == "ms"
    assert data["num_layers"] == 2 and data["torch_threads"] == 1
    for key in ("attention", "ffn", "comm", "step"):
        _finite_fit(data[key])
    assert set(data["transport"]) == {"local", "copy"}
    assert data["comm_transport"] == "local"
    assert len(data["points"]["attention_decode"]) == 4  # 2 batches x 2 contexts
    assert len(data["points"]["attention_prefill"]) == 8  # 2 sequences x 2 chunks x 2 starts
    costs = StageCosts.from_profile(out)
    assert costs.num_layers == 2 and costs.source == "measured"
    sim = SimCosts.from_profile(out)
    assert sim.step_beta_ms == data["step"]["beta"]
    assert sim.prefill_token_ms == data["prefill"]["token_ms"]
    # the planner takes it as its --profile
    code = main(["plan", "--profile", str(out), "--batch", "8", "--theta", "100", "--json"])
    plan_out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(plan_out)["num_layers"] == 2


def test_profile_rejects_bad_input(tmp_path, capsys) -> None:
    for argv, needle in (
        (["--transports", "local,pigeon"], "unknown transport"),
        (["--comm-from", "shm", "--transports", "local"], "comm-from"),
        (["--threads", "0"], "threads"),
    ):
        code = main(
            [
                "profile",
                "--model",
                "builtin:tiny-llama",
                "--out",
                str(tmp_path / "p.json"),
                "--grid",
                "small",
                "--quiet",
                *argv,
            ]
        )
        _, err = capsys.readouterr()
        assert code == 2 and needle in err, err
    code = main(
        ["profile", "--model", "/no/such/model", "--out", str(tmp_path / "p.json"), "--quiet"]
    )
    _, err = capsys.readouterr()
    assert code == 2 and "does not exist" in err


SMALL_RUNTIME_VALIDATION = [
    *("sim-validate", "runtime", "--model", "builtin:tiny-llama", "--grid", "small"),
    *("--requests", "4", "--prompt-len", "8", "--output-len", "6", "--repeats", "1"),
    *("--threads", "1", "--json", "--quiet"),
]
"""A CI-sized `sim-validate runtime`: 4 requests of 8 prompt and 6 output tokens."""


def test_runtime_validation_runs_and_is_well_formed(capsys) -> None:
    code = main([*SMALL_RUNTIME_VALIDATION, "--rounds", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d["rounds"] == 2 and d["profile"]["rounds"] == 2
    assert [r["run"] for r in d["runs"]] == [
        "aggregated M=1",
        "AFD 1A1F M=1 (local)",
        "AFD 1A1F M=2 (local)",
    ]
    for r in d["runs"]:
        assert r["output_tokens"] == 4 * 6
        assert r["real_steps"] == r["sim_steps"] == 6  # one prefill step, then 5 decode steps
        assert r["real_step_ms"] > 0 and r["sim_step_ms"] > 0
        assert r["real_tokens_per_s"] > 0 and r["sim_tokens_per_s"] > 0
        assert math.isfinite(r["step_ms_error"]) and math.isfinite(r["tokens_per_s_error"])
        if r["run"].startswith("AFD"):
            # no overlap is never faster (up to float rounding)
            assert r["sim_serial_step_ms"] >= r["sim_step_ms"] * (1 - 1e-9) > 0
        else:
            assert r["sim_serial_step_ms"] is None
    code = main(["sim-validate", "runtime", "--transport", "udp", "--grid", "small", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2 and "choose one of" in err


def test_runtime_validation_over_worker_processes(capsys) -> None:
    # the AFD runs go through real worker processes over shm; the profile times shm transfers
    code = main([*SMALL_RUNTIME_VALIDATION, "--transport", "shm"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert [r["run"] for r in d["runs"]] == [
        "aggregated M=1",
        "AFD 1A1F M=1 (shm)",
        "AFD 1A1F M=2 (shm)",
    ]
    # the profile timed decode steps of real worker processes over shm, one point per grid N,
    # and the AFD runs are simulated with the per-step extra fitted from them, not the
    # in-process one
    shm = d["profile"]["worker_steps"]["shm"]
    assert [p[0] for p in shm["worker_step_points"]] == [1, 4]  # SMALL_GRID.step_batches
    assert all(p[2] > 0 for p in shm["worker_step_points"])
    assert shm["afd_beta"] >= 0 and shm["afd_alpha"] >= 0
    # and prefill steps: S in SMALL_GRID.prefill_sequences prompts of its longest chunk
    assert [p[:2] for p in shm["worker_prefill_points"]] == [[1, 32], [4, 32]]
    assert all(p[2] > 0 for p in shm["worker_prefill_points"])
    assert shm["afd_prefill_token_ms"] >= 0
    # and decode steps of an M = 2 engine: what a second microbatch costs
    assert [p[0] for p in shm["worker_step_points_m2"]] == [1, 4]
    assert shm["afd_microbatch_ms"] >= 0
    in_process_alpha = d["profile"]["step"]["alpha"]
    in_process_prefill = d["profile"]["step"]["prefill_token_ms"]
    for r in d["runs"]:
        if r["run"].startswith("AFD"):
            assert r["sim_afd_step_ms"] == shm["afd_beta"]
            assert r["sim_step_alpha_ms"] == pytest.approx(in_process_alpha + shm["afd_alpha"])
            assert r["sim_step_prefill_token_ms"] == pytest.approx(
                in_process_prefill + shm["afd_prefill_token_ms"]
            )
            assert r["sim_afd_microbatch_ms"] == shm["afd_microbatch_ms"]
        else:
            assert r["sim_afd_step_ms"] is None
            assert r["sim_step_alpha_ms"] == in_process_alpha
            assert r["sim_step_prefill_token_ms"] == in_process_prefill
    for r in d["runs"]:
        assert r["output_tokens"] == 4 * 6
        assert r["sim_steps"] == 6
        # a worker process may start stepping before the last of the 4 requests reaches it
        # over the control plane: each request that arrives after a step began prefills in a
        # step of its own, so up to 3 extra steps (seen: 8 on a loaded 2-core machine)
        assert 6 <= r["real_steps"] <= 9
        assert math.isfinite(r["step_ms_error"]) and r["real_step_ms"] > 0


def test_runtime_validation_interleaves_worker_process_timing_with_the_runs(capsys) -> None:
    code = main([*SMALL_RUNTIME_VALIDATION, "--transport", "shm", "--interleave", "--rounds", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    rounds = d["interleaved"]["shm"]  # re-timed before each round's worker-process runs
    assert len(rounds) == 2
    assert all(e["afd_beta"] >= 0 and e["afd_alpha"] >= 0 for e in rounds)
    prefill = d["profile"]["step"]["prefill_token_ms"]

    def median(key: str) -> float:
        return float(np.median([e[key] for e in rounds]))

    for r in d["runs"]:
        if r["run"].startswith("AFD"):  # simulated with each coefficient's median over rounds
            assert r["sim_afd_step_ms"] == pytest.approx(median("afd_beta"))
            assert r["sim_step_prefill_token_ms"] == pytest.approx(
                prefill + median("afd_prefill_token_ms")
            )
            assert r["sim_afd_microbatch_ms"] == pytest.approx(median("afd_microbatch_ms"))
            assert r["sim_afd_step_ms"] != d["profile"]["worker_steps"]["shm"]["afd_beta"]
        else:
            assert r["sim_afd_step_ms"] is None


def test_worker_afd_fit_is_a_robust_line_through_the_residuals() -> None:
    from afdserve.calibration.fit_workers import _worker_afd_fit
    from afdserve.sim.fit import AffineFit

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
    from afdserve.sim.fit import AffineFit

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
    from afdserve.calibration.validate_runtime import RuntimeRun, Workload, _engine_options

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
    from afdserve.sim.costs import SimCosts
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
