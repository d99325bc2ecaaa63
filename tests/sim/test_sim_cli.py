"""`afdserve simulate` and `sim-validate theory` as commands: each runs once (exit status 0 and
the shape of what it prints), bad input is one line with exit status 2, and the simulator's
commands never import torch. What they compute is tested through the library:
test_sim_search, test_sim_bundle, test_sim_validate_theory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from afdserve.cli import main
from afdserve.planner import traces_dir

ROOT = Path(__file__).resolve().parents[2]
HAVE_TRACES = (traces_dir() / "azure_2023_conv.csv").is_file()
needs_traces = pytest.mark.skipif(not HAVE_TRACES, reason="shared traces not found")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@needs_traces
def test_simulate_command(capsys) -> None:
    """A search over one candidate per family prints a row per family."""
    code, out, err = run(
        capsys,
        *("simulate", "--model", "llama-3.1-8b", "--hardware", "h100", "--gpus", "2"),
        *("--workload", "azure-conv", "--ttft-slo-ms", "3000", "--tpot-slo-ms", "100"),
        *("--requests", "30", "--ratios", "1", "--batches", "32", "--microbatches", "1"),
        *("--finalists", "1", "--quiet"),
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("llama-3.1-8b on 2 x h100, workload azure-conv: SLO TTFT <= 3000")
    assert lines[2].split()[0] == "family"
    assert [line.split()[0] for line in lines[3:7]] == [
        "afd",
        "afd+prefill",
        "aggregated",
        "pd-split",
    ]


@needs_traces
def test_sim_validate_theory_command(capsys, monkeypatch) -> None:
    """One case (the first coefficient set and workload) prints its row and the summary."""
    import afdserve.sim.validate_theory as vt

    sets, loads = vt.default_coefficient_sets()[:1], vt.default_workloads()[:1]
    monkeypatch.setattr(vt, "default_coefficient_sets", lambda: sets)
    monkeypatch.setattr(vt, "default_workloads", lambda: loads)
    code, out, err = run(capsys, "sim-validate", "theory", "--steps", "50", "--quiet")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["coefficients", "workload"]
    assert lines[1].startswith(sets[0].name) and f" {loads[0].name} " in lines[1]
    assert lines[2].startswith("closed_form: gap median ")
    assert all(line.startswith("barrier: ") for line in lines[3:]) and len(lines) <= 4


@needs_traces
def test_single_bundle_on_the_reference_engine(capsys) -> None:
    argv = [
        "simulate",
        "--model",
        "llama-3.1-8b",
        "--hardware",
        "h100",
        "--workload",
        "azure-conv",
        "--ratio",
        "2",
        "--batch",
        "16",
        "--requests",
        "40",
        "--json",
    ]
    reports = {}
    for engine in (None, "fast", "reference"):
        code, out, err = run(capsys, *argv, *(["--engine", engine] if engine else []))
        assert code == 0, err
        d = json.loads(out)
        for timing in ("wall_s", "speed"):
            d.pop(timing)
        reports[engine] = d
    assert reports["fast"] == reports[None]  # the default is the fast engine, unchanged
    ref = reports["reference"]
    assert ref["requests_finished"] == 40 and ref["output_tokens"] == reports[None]["output_tokens"]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@needs_traces
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path) -> None:
    empty = _write(tmp_path / "empty.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n")
    bad = _write(tmp_path / "bad.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,x,3\n")
    base = [
        "simulate",
        "--model",
        "llama-3.1-8b",
        "--hardware",
        "h100",
        "--ttft-slo-ms",
        "1000",
        "--tpot-slo-ms",
        "50",
    ]
    cases = [
        ([*base, "--gpus", "4", "--workload", empty], "empty trace"),
        ([*base, "--gpus", "4", "--workload", bad], "must be a number"),
        ([*base, "--gpus", "0", "--workload", "azure-conv"], "no devices"),
        ([*base, "--gpus", "4", "--workload", "no-such-trace"], "no trace file"),
        (
            [
                "simulate",
                "--model",
                "llama-3.1-8b",
                "--hardware",
                "h100",
                "--gpus",
                "2",
                "--workload",
                "azure-conv",
                "--ttft-slo-ms",
                "0.5",
                "--tpot-slo-ms",
                "0.1",
                "--requests",
                "40",
                "--ratios",
                "1",
                "--batches",
                "32",
                "--microbatches",
                "1",
                "--quiet",
            ],
            "no configuration meets",
        ),
        ([*base, "--gpus", "4", "--workload", "azure-conv", "--hardware", "nope"], "hardware"),
        (["simulate", "--workload", "azure-conv", "--gpus", "2"], "needs --model"),
        (["simulate", "--workload", "azure-conv", "--ratios", "0-3"], "integers >= 1"),
        ([*base, "--gpus", "4", "--workload", "azure-conv", "--engine", "reference"], "--ratio"),
        (
            [
                *base,
                "--workload",
                "azure-conv",
                "--ratio",
                "2",
                "--closed-loop",
                "--engine",
                "reference",
            ],
            "no closed loop",
        ),
        (["sim-validate"], "sim-validate theory, runtime or published"),
    ]
    for argv, needle in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert needle in err, (needle, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


SCRIPT = """
import pkgutil, importlib, sys
import afdserve.sim as sim
for mod in pkgutil.iter_modules(sim.__path__):
    importlib.import_module("afdserve.sim." + mod.name)
from afdserve.cli import main
assert main(["simulate", "--model", "llama-3.1-8b", "--hardware", "h100", "--workload",
             "azure-conv", "--ratio", "2", "--batch", "16", "--requests", "30", "--json"]) == 0
assert main(["simulate", "--model", "llama-3.1-8b", "--hardware", "h100", "--workload",
             "azure-conv", "--ratio", "2", "--batch", "16", "--requests", "30", "--json",
             "--engine", "reference"]) == 0
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("LOADED", heavy)
sys.exit(1 if heavy else 0)
"""


@needs_traces
def test_simulator_never_imports_torch() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout


@needs_traces
def test_expert_parallel_flags_reach_the_bundle_and_the_search(capsys) -> None:
    """`--ffn-devices`, `--expert-imbalance`, `--redundant-experts` with `--ratio --model`: the
    line of what was assumed, the same in the JSON, and a slower FFN when it is imbalanced;
    the search takes the two EP flags and says so in its notes."""
    one = ["simulate", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--workload"]
    one += ["azure-conv", "--ratio", "2", "--batch", "16", "--requests", "30", "--closed-loop"]
    one += ["--ffn-devices", "4"]
    code, out, err = run(capsys, *one, "--expert-imbalance", "1.4", "--redundant-experts", "8")
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("expert parallelism: 4 FFN device(s), a token reaches 3.63")
    assert "expert imbalance 1.4" in first and "8 redundant experts" in first
    # the roofline FFN is max(weight streaming, compute) and imbalance slows only the compute:
    # 8 x 512 tokens a layer make this FFN compute-bound (at r * B = 32 the weights bind)
    big = [*one[:7], "--ratio", "8", "--batch", "512", "--requests", "4096", "--closed-loop"]
    big += ["--ffn-devices", "4"]
    tpot = {}
    for imb in ("1", "2"):
        code, out, err = run(capsys, *big, "--expert-imbalance", imb, "--json")
        assert code == 0, err
        d = json.loads(out)
        assert d["expert_parallel"]["expert_imbalance"] == float(imb)
        tpot[imb] = d["tpot_ms"]["mean"]
    assert tpot["2"] > tpot["1"]
    code, out, err = run(
        capsys,
        *("simulate", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--gpus", "4"),
        *("--workload", "azure-conv", "--ttft-slo-ms", "3000", "--tpot-slo-ms", "100"),
        *("--requests", "30", "--ratios", "1", "--batches", "32", "--microbatches", "1"),
        *("--finalists", "1", "--quiet", "--expert-imbalance", "1.3"),
        *("--redundant-experts", "8"),
    )
    assert code == 0, err
    assert "note: expert imbalance 1.3" in out and "note: 8 redundant experts" in out
    # one device cannot hold 128 + 8 expert slots: no instance holding experts has one device
    from afdserve.planner import load_hardware, load_model
    from afdserve.sim.search import SearchSpace, _candidates

    spec, h100 = load_model("qwen3-30b-a3b"), load_hardware("h100")
    space = SearchSpace(ratios=(1,), batches=(32,), microbatches=(1,))

    def ffn_devices(ep):
        cands = _candidates(spec, h100, 4, 1000.0, space, [], ep)
        return {c.params.get("ffn_devices", c.params.get("instance_devices")) for c in cands}

    assert 1 in ffn_devices(None)
    assert 1 not in ffn_devices({"redundant_experts": 8})


@needs_traces
def test_expert_parallel_flags_bad_input(capsys, tmp_path) -> None:
    one = ["simulate", "--hardware", "h100", "--workload", "azure-conv", "--ratio", "2"]
    profile = tmp_path / "p.json"
    profile.write_text(
        json.dumps(
            {
                "attention": {"alpha": 0, "beta": 1},
                "ffn": {"alpha": 0, "beta": 1},
                "comm": {"alpha": 0, "beta": 0},
            }
        )
    )
    search = ["simulate", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--gpus", "4"]
    search += ["--workload", "azure-conv", "--ttft-slo-ms", "3000", "--tpot-slo-ms", "100"]
    cases = [
        ([*one, "--model", "qwen3-30b-a3b", "--expert-imbalance", "0.9"], "a number >= 1"),
        (
            [*one, "--model", "qwen3-30b-a3b", "--redundant-experts", "4", "--ffn-devices", "1"],
            "more FFN devices",
        ),
        ([*one, "--model", "llama-3.1-8b", "--expert-imbalance", "1.2"], "is dense"),
        (
            [
                "simulate",
                "--workload",
                "azure-conv",
                "--ratio",
                "2",
                "--profile",
                str(profile),
                "--expert-imbalance",
                "1.2",
            ],
            "--expert-imbalance goes with --model",
        ),
        ([*search, "--ffn-devices", "2"], "--ffn-devices goes with --ratio"),
        ([*search, "--redundant-experts", "-1"], "an integer >= 0"),
    ]
    for argv, needle in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert needle in err, (needle, err)
        assert len(err.strip().splitlines()) == 1, err


@needs_traces
def test_a_plans_coefficients_simulate_at_a_ratio(capsys, tmp_path) -> None:
    """`afdserve plan --model --json` prices both links (comm_scales_with 'both'); the same
    coefficients as a profile simulate one bundle, whose ratio picks the busier link."""
    code, out, err = run(
        capsys,
        *("plan", "--model", "qwen3-30b-a3b", "--hw", "h100", "--batch", "32"),
        *("--theta", "1000", "--ffn-devices", "2", "--json"),
    )
    assert code == 0, err
    coeffs = json.loads(out)["coefficients"]
    assert coeffs["comm"]["scales_with"] == "both" and "comm_ffn" in coeffs
    profile = tmp_path / "plan.json"
    profile.write_text(json.dumps(coeffs))
    for ratio in (1, 4):
        code, out, err = run(
            capsys,
            *("simulate", "--ratio", str(ratio), "--batch", "8", "--profile", str(profile)),
            *("--workload", "azure-conv", "--requests", "10", "--quiet", "--json"),
        )
        assert code == 0, err
        assert json.loads(out)
