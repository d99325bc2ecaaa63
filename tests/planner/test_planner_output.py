"""What `afdserve plan` and `afdserve workload` show: the text tables, the plot, the JSON hook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from afdserve.errors import UserInputError
from afdserve.planner import (
    RooflineSetup,
    StageCosts,
    WorkloadStats,
    load_hardware,
    load_model,
    load_trace,
    plan,
    stats_from_trace,
    trace_files,
    traces_dir,
)
from afdserve.planner.deployment import roofline_deployment
from afdserve.planner.plot import plot_plan
from afdserve.planner.render import json_default, plan_title, render_plan, render_workload

ISSUE = StageCosts.explicit(5e-5, 0.6, 0.02, 1.0, 0.005, 0.2)
HAVE_TRACES = (traces_dir() / "azure_2023_conv.csv").is_file()
needs_traces = pytest.mark.skipif(not HAVE_TRACES, reason="shared traces not found")


def test_plan_table_marks_the_best_ratio() -> None:
    result = plan(ISSUE, 64, WorkloadStats(2000.0))
    text = render_plan(result, {})
    assert "r* = 4.688" in text
    rows = text.splitlines()[-len(result.table) :]
    assert [row.split()[0] for row in rows] == [str(r.r) for r in result.table]
    assert [row for row in rows if row.endswith("<- best")] == [rows[3]]  # r = 4
    assert "E[tau]" not in text  # no variance, no barrier columns


def test_plan_table_adds_barrier_columns_with_a_variance() -> None:
    result = plan(ISSUE, 64, WorkloadStats(2000.0, 250_000.0))
    text = render_plan(result, {})
    header = text.splitlines()[-len(result.table) - 1].split()
    assert header[-3:] == ["E[tau]", "thr/inst(b)", "ok"]
    assert "barrier-aware: 5" in text


def test_plan_with_a_model_names_it_and_its_sizing() -> None:
    h100 = load_hardware("h100")
    dep = roofline_deployment(
        load_model("llama-3.1-8b"), h100, h100, RooflineSetup(batch=64), 1500.0
    )
    result = plan(dep.costs, 64, WorkloadStats(1500.0), memory=dep.memory)
    extra = dep.to_dict()
    title = plan_title(result, extra)
    assert title.split("\n") == [
        "llama-3.1-8b: attention 1xh100, FFN 1xh100",
        "B = 64, theta = 1500.0 (explicit)",
    ]
    lines = render_plan(result, extra).splitlines()
    assert lines[:3] == [
        title.split("\n")[0],
        "  note: attention instance sized to 1 x h100 by memory",
        "  note: FFN instance sized to 1 x h100 by memory",
    ]
    assert any(line.startswith("memory: attention") and "ok" in line for line in lines)
    assert plan_title(result, {}) == title.split("\n")[1]


@needs_traces
def test_workload_table_has_a_row_per_trace() -> None:
    files = trace_files()
    rows = [stats_from_trace(load_trace(str(f))) for f in files]
    assert len(rows) == 4 and all(s.theta > 0 for s in rows)
    lines = render_workload(rows).splitlines()
    assert lines[0].split()[0] == "workload"
    assert len(lines) == 1 + len(rows) + 1  # header, a row each, what theta means
    for f, line in zip(files, lines[1:-1], strict=True):
        assert f.name in line
    assert lines[-1].startswith("theta = sum(D*P + D*(D-1)/2) / sum(D)")


def test_workload_table_of_distributions_has_no_request_count() -> None:
    row = WorkloadStats(1499.0, 1e5, source="prompt fixed:1000")
    table_row = render_workload([row]).splitlines()[1]
    assert table_row.split()[-3:] == ["-", "1499.0", "316.228"]  # P + D/2 unknown, sqrt(sigma2)


@needs_traces
def test_plot_of_a_model_plan(tmp_path) -> None:
    stats = stats_from_trace(load_trace("azure-conv"))
    dep = roofline_deployment(
        load_model("qwen3-235b-a22b"),
        load_hardware("h20"),
        load_hardware("h800"),
        RooflineSetup(batch=64),
        stats.theta,
    )
    result = plan(dep.costs, 64, stats, tpot_slo_ms=50, memory=dep.memory)
    png = tmp_path / "plan.png"
    plot_plan(result, png, title=plan_title(result, dep.to_dict()))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_unwritable_plot_is_a_user_error(tmp_path) -> None:
    result = plan(ISSUE, 64, WorkloadStats(1.0))
    with pytest.raises(UserInputError, match="cannot write plot"):
        plot_plan(result, Path(tmp_path / "missing-dir" / "p.png"))


def test_json_default_writes_numpy_values_as_python_ones() -> None:
    d = {"x": np.float64(1.5), "n": np.int64(3), "a": np.arange(3)}
    assert json.loads(json.dumps(d, default=json_default)) == {"x": 1.5, "n": 3, "a": [0, 1, 2]}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        json.dumps(object(), default=json_default)
