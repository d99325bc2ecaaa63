"""`afdserve plan` and `afdserve workload`, in process and as a subprocess."""

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


def test_plan_explicit_json(capsys) -> None:
    code, out, err = run(capsys, "plan", *ISSUE, "--theta", "2000", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["theta"] == 2000
    assert d["r_a"] == pytest.approx(4.6875)
    assert d["r_c"] == pytest.approx(-0.375)
    assert d["r_peak"] == pytest.approx(0.8839, abs=5e-5)
    assert d["r_star"] == pytest.approx(4.6875)
    assert d["r_int"] == 4
    assert d["r_int_barrier"] is None
    thr = [row["throughput_per_instance"] for row in d["table"][:5]]
    assert thr == pytest.approx([4.5714, 6.0952, 6.8571, 7.3143, 7.2072], abs=5e-5)
    assert {"cycle_ms", "attention_idle", "ffn_idle"} <= set(d["table"][0])
    assert d["microbatches"]["m"] == 3


def test_plan_with_sigma2_gives_barrier_ratio(capsys) -> None:
    code, out, _ = run(capsys, "plan", *ISSUE, "--theta", "2000", "--sigma2", "250000", "--json")
    assert code == 0
    assert json.loads(out)["r_int_barrier"] == 5


def test_plan_table_is_readable(capsys) -> None:
    code, out, _ = run(capsys, "plan", *ISSUE, "--theta", "2000")
    assert code == 0
    assert "r* = 4.688" in out and "<- best" in out
    best = [line for line in out.splitlines() if "<- best" in line][0]
    assert best.split()[0] == "4"


def test_plan_from_distributions(capsys) -> None:
    code, out, _ = run(
        capsys, "plan", *ISSUE, "--prompt", "fixed:1000", "--output", "geometric:0.002", "--json"
    )
    assert code == 0
    d = json.loads(out)
    assert d["theta"] == pytest.approx(1499.0)
    assert d["sigma2"] > 0 and d["r_int_barrier"] is not None


def test_plan_from_profile(tmp_path, capsys) -> None:
    profile = {
        "source": "measured",
        "model": "m",
        "device": "cpu",
        "units": "ms",
        "num_layers": 4,
        "attention": {"alpha": 5e-5, "beta": 0.6},
        "ffn": {"alpha": 0.02, "beta": 1.0},
        "comm": {"alpha": 0.005, "beta": 0.2},
    }
    f = tmp_path / "profile.json"
    f.write_text(json.dumps(profile))
    code, out, err = run(
        capsys,
        "plan",
        "--profile",
        str(f),
        "--batch",
        "64",
        "--theta",
        "2000",
        "--tpot-slo-ms",
        "29",
        "--json",
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["num_layers"] == 4 and d["coefficients"]["source"] == "measured"
    assert d["r_int_unconstrained"] == 4
    assert d["r_int"] == 4  # step 4 * 7 = 28 ms fits 29 ms; r = 5 would take 29.6 ms
    assert [row["tpot_ok"] for row in d["table"][3:5]] == [True, False]


@needs_traces
def test_plan_issue_model_command(capsys, tmp_path) -> None:
    png = tmp_path / "plan.png"
    code, out, err = run(
        capsys,
        "plan",
        "--model",
        "qwen3-235b-a22b",
        "--attention-hw",
        "h20",
        "--ffn-hw",
        "h800",
        "--workload",
        "azure-conv",
        "--batch",
        "64",
        "--tpot-slo-ms",
        "50",
        "--json",
        "--plot",
        str(png),
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["workload"]["source"] == "azure-conv"
    assert d["num_layers"] == 94 and d["coefficients"]["source"] == "roofline"
    assert d["hardware"]["ffn"]["devices"] == 8  # 454 GB of experts need 8 x 80 GB
    assert d["memory"]["attention_ok"] and d["memory"]["ffn_ok"]
    assert d["r_int"] is not None
    best = d["table"][d["r_int"] - 1]
    assert best["step_ms"] <= 50
    assert "ffn" in d["unit_costs"]  # H800 has a catalog price
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plan_model_with_explicit_prices(capsys) -> None:
    code, out, err = run(
        capsys,
        "plan",
        "--model",
        "llama-3.1-8b",
        "--hw",
        "h100",
        "--batch",
        "64",
        "--theta",
        "1500",
        "--attention-price",
        "3",
        "--ffn-price",
        "3",
        "--json",
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["objective"] == {"unit": "$/h", "attention_weight": 3.0, "ffn_weight": 3.0}
    assert d["hardware"]["attention"]["devices"] == 1


@needs_traces
def test_workload_prints_theta_for_every_shared_trace(capsys) -> None:
    code, out, _ = run(capsys, "workload")
    assert code == 0
    for f in (
        "azure_2023_conv.csv",
        "azure_2023_code.csv",
        "mooncake_conversation.jsonl",
        "mooncake_synthetic.jsonl",
    ):
        assert f in out
    code, out, _ = run(capsys, "workload", "--json")
    rows = json.loads(out)
    assert len(rows) == 4 and all(r["theta"] > 0 for r in rows)


def test_workload_distributions(capsys) -> None:
    code, out, _ = run(
        capsys, "workload", "--prompt", "fixed:1000", "--output", "geometric:0.002", "--json"
    )
    assert code == 0
    assert json.loads(out)[0]["theta"] == pytest.approx(1499.0)


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


def test_empty_trace_is_exit_2(tmp_path, capsys) -> None:
    f = tmp_path / "empty.csv"
    f.write_text("")
    code, _, err = run(capsys, "plan", *ISSUE, "--workload", str(f))
    assert code == 2 and "empty trace" in err and str(f) in err


def test_unwritable_plot_is_exit_2(tmp_path, capsys) -> None:
    code, _, err = run(
        capsys, "plan", *ISSUE, "--theta", "1", "--plot", str(tmp_path / "missing-dir" / "p.png")
    )
    assert code == 2 and "cannot write plot" in err


def test_subprocess_plan_json() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "afdserve.cli", "plan", *ISSUE, "--theta", "2000", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["r_int"] == 4 and d["r_star"] == pytest.approx(4.6875)
    bad = subprocess.run(
        [sys.executable, "-m", "afdserve.cli", "plan", *ISSUE[:-2], "--batch", "0", "--theta", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
