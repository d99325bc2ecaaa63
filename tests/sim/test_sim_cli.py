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
    assert [line.split()[0] for line in lines[3:6]] == ["afd", "aggregated", "pd-split"]


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
        (["sim-validate"], "theory or sim-validate runtime"),
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
