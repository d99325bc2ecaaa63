"""`afdserve simulate`, `sim-validate theory` and the torch-free import, through the CLI."""

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

SMALL_SEARCH = [
    "simulate",
    "--model",
    "llama-3.1-8b",
    "--hardware",
    "h100",
    "--gpus",
    "3",
    "--workload",
    "azure-conv",
    "--ttft-slo-ms",
    "3000",
    "--tpot-slo-ms",
    "100",
    "--requests",
    "60",
    "--ratios",
    "1-2",
    "--batches",
    "32",
    "--microbatches",
    "1,2",
    "--finalists",
    "1",
    "--quiet",
]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@needs_traces
def test_search_prints_the_best_of_each_family_and_plots(capsys, tmp_path) -> None:
    code, out, err = run(capsys, *SMALL_SEARCH, "--json", "--plot", str(tmp_path))
    assert code == 0, err
    d = json.loads(out)
    assert set(d["best"]) == {"afd", "aggregated", "pd-split"}
    for fam, best in d["best"].items():
        assert best is not None, fam
        assert best["devices"] <= 3
        assert best["slo_attainment"] >= 0.9
        assert best["goodput_tok_s_per_device"] > 0
        assert best["tpot_ms"]["p90"] <= 100 and best["ttft_ms"]["p90"] <= 3000
        assert best["tokens_per_user_s"] > 0
    for png in ("latency_cdf.png", "ratio_sweep.png", "timeline.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    code, out, _ = run(capsys, *SMALL_SEARCH)
    assert code == 0 and "afd" in out and "aggregated" in out and "pd-split" in out


@needs_traces
def test_single_bundle_simulation(capsys, tmp_path) -> None:
    code, out, err = run(
        capsys,
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
        "--microbatches",
        "2",
        "--requests",
        "50",
        "--ttft-slo-ms",
        "1000",
        "--tpot-slo-ms",
        "50",
        "--json",
        "--plot",
        str(tmp_path),
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["requests_finished"] == 50 and d["instances"] == 3
    assert (tmp_path / "timeline.png").is_file() and (tmp_path / "latency_cdf.png").is_file()


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


@needs_traces
def test_theory_validation_command(capsys, tmp_path) -> None:
    """The CI-sized run: all 36 cases (6 coefficient sets x 6 workloads), few steps."""
    code, out, err = run(
        capsys,
        "sim-validate",
        "theory",
        "--steps",
        "120",
        "--json",
        "--quiet",
        "--plot",
        str(tmp_path),
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["summary"]["cases"] == len(d["cases"]) >= 24
    workloads = {c["workload"] for c in d["cases"]}
    assert {"azure-conv", "azure-code", "mooncake-conv", "mooncake-synthetic"} <= workloads
    for c in d["cases"]:
        sims = {p["r"]: p["sim_throughput_per_instance"] for p in c["points"]}
        assert c["r_sim"] == max(sims, key=sims.get)
        assert c["r_closed_form"] in sims and (c["r_barrier"] is None or c["r_barrier"] in sims)
        assert 0.0 <= c["gap_closed_form"] < 1.0
        assert all(v > 0 for v in sims.values())
    for which in ("closed_form", "barrier"):
        s = d["summary"][which]
        assert 0.0 <= s["min"] <= s["median"] <= s["p90"] <= s["max"] < 1.0
    assert (tmp_path / "theory_gaps.png").is_file()
    assert len(list(tmp_path.glob("sweep_*.png"))) == len({c["coefficients"] for c in d["cases"]})


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
