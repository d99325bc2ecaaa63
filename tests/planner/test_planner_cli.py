"""`afdserve plan` and `afdserve workload` as commands: each verb runs once (exit status 0 and
the shape of what it prints), and bad input is one line with exit status 2. What the verbs
compute is tested through the library: test_planner_sources, test_planner_deployment,
test_planner_output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from afdserve.cli import main
from afdserve.planner import traces_dir
from afdserve.planner.roofline import Efficiency

ROOT = Path(__file__).resolve().parents[2]
ISSUE = [
    "--alpha-a",
    "5e-5",
    "--beta-a",
    "0.6",
    "--alpha-f",
    "0.02",
    "--beta-f",
    "1.0",
    "--alpha-c",
    "0.005",
    "--beta-c",
    "0.2",
    "--batch",
    "64",
]
HAVE_TRACES = (traces_dir() / "azure_2023_conv.csv").is_file()
needs_traces = pytest.mark.skipif(not HAVE_TRACES, reason="shared traces not found")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_command() -> None:
    """`python -m afdserve.cli plan`: a model's plan as JSON (the plan and the deployment it was
    sized for; explicit prices are the objective, not the catalog's), explicit coefficients as
    a table, and bad input as one line with exit status 2."""

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "afdserve.cli", "plan", *argv],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )

    model = ["--model", "llama-3.1-8b", "--hw", "h100", "--batch", "64", "--theta", "1500"]
    proc = cli(*model, "--attention-price", "3", "--ffn-price", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert {"r_star", "r_int", "table", "memory", "model", "hardware", "sizing_notes"} <= set(d)
    assert d["objective"] == {"unit": "$/h", "attention_weight": 3.0, "ffn_weight": 2.0}
    assert d["hardware"]["attention"]["devices"] == 1
    assert len(d["table"]) >= 1 and {"r", "step_ms", "throughput_per_instance"} <= set(
        d["table"][0]
    )
    proc = cli(*ISSUE, "--theta", "2000")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("workload: explicit: theta = 2000.0")
    assert sum(line.endswith("<- best") for line in lines) == 1
    bad = cli(*ISSUE[:-2], "--batch", "0", "--theta", "1")
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1


@needs_traces
def test_workload_command(capsys) -> None:
    """`afdserve workload`: a row per shared trace by default, JSON of length distributions."""
    code, out, err = run(capsys, "workload")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["workload", "requests"] and lines[-1].startswith("theta = ")
    assert len(lines) == 1 + 4 + 1
    for f in (
        "azure_2023_conv.csv",
        "azure_2023_code.csv",
        "mooncake_conversation.jsonl",
        "mooncake_synthetic.jsonl",
    ):
        assert sum(f in line for line in lines) == 1
    code, out, err = run(
        capsys, "workload", "--prompt", "fixed:1000", "--output", "geometric:0.002", "--json"
    )
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 1 and {"source", "theta", "sigma2"} <= set(rows[0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", *ISSUE[:-2], "--batch", "0", "--theta", "1"], "--batch must be >= 1"),
        (
            ["plan", "--alpha-a", "-1", *ISSUE[2:], "--theta", "1"],
            "--alpha-a must be a number >= 0",
        ),
        (["plan", *ISSUE[:6], "--batch", "4", "--theta", "1"], "need --beta-f"),
        (["plan", *ISSUE, "--theta", "-5"], "--theta must be a number >= 0"),
        (["plan", *ISSUE], "give the workload one way"),
        (["plan", *ISSUE, "--theta", "1", "--workload", "azure-conv"], "one way"),
        (["plan", "--batch", "4", "--theta", "1"], "give stage costs one way"),
        (["plan", *ISSUE, "--theta", "1", "--model", "llama-3.1-8b"], "one way"),
        (
            ["plan", "--model", "gpt-9", "--hw", "h100", "--batch", "4", "--theta", "1"],
            "unknown model 'gpt-9'",
        ),
        (
            ["plan", "--model", "llama-3.1-8b", "--hw", "tpu9", "--batch", "4", "--theta", "1"],
            "unknown hardware 'tpu9'",
        ),
        (["plan", "--model", "llama-3.1-8b", "--batch", "4", "--theta", "1"], "needs hardware"),
        (["plan", *ISSUE, "--workload", "/nonexistent/trace.csv"], "no trace file"),
        (["plan", *ISSUE, "--prompt", "fixed:10"], "--prompt and --output go together"),
        (["plan", *ISSUE, "--prompt", "fixed:10", "--output", "zipf:1"], "bad distribution"),
        (["plan", *ISSUE, "--theta", "1", "--sigma2", "-1"], "--sigma2 must be"),
        (["plan", *ISSUE, "--theta", "1", "--tpot-slo-ms", "0"], "--tpot-slo-ms must be > 0"),
        (["plan", *ISSUE, "--theta", "1", "--attention-price", "2"], "go together"),
        (["plan", *ISSUE, "--theta", "1", "--hw", "h100"], "--hw only applies with --model"),
        (["plan", *ISSUE, "--theta", "1", "--r-max", "0"], "--r-max must be >= 1"),
        (["plan", *ISSUE, "--theta", "1", "--comm-scales-with", "both"], "give one link"),
        (
            ["plan", "--profile", "/nonexistent.json", "--batch", "4", "--theta", "1"],
            "cannot read profile",
        ),
        (["workload", "/nonexistent.csv"], "no trace file"),
        (["workload", "--prompt", "fixed:1"], "go together"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", *ISSUE[:-2], "--batch", "abc", "--theta", "1"],
        ["plan", "--theta", "1", "--alpha-a", "1"],  # --batch missing
        ["plan", *ISSUE, "--theta", "1", "--link", "carrier-pigeon"],
    ],
)
def test_malformed_flags_are_one_line_and_exit_2(capsys, argv) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err


def test_the_ffn_roofline_assumptions_are_flags(capsys) -> None:
    """`--ffn-combine` and `--moe-flops-eff` reach the roofline FFN (sensitivity knobs)."""
    base = ["plan", "--model", "qwen3-30b-a3b", "--hw", "h100", "--batch", "32", "--theta", "900"]

    def ffn(*flags: str) -> dict:
        code, out, err = run(capsys, *base, *flags, "--json")
        assert code == 0, err
        return json.loads(out)["coefficients"]["ffn"]

    default = ffn()
    assert "combine" not in default  # an MoE FFN: 'sum' (the profile default, not printed)
    assert ffn("--ffn-combine", "max")["combine"] == "max"
    half = Efficiency().moe_flops / 2
    assert ffn("--moe-flops-eff", str(half))["alpha"] == pytest.approx(2 * default["alpha"])
    code, _, err = run(capsys, *base, "--moe-flops-eff", "0")
    assert code == 2 and "moe_flops must be in (0, 1]" in err
