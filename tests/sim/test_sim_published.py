"""Sizing against published deployments (issue 18, item 6): the data files are what their
sources say, and `afdserve sim-validate published` predicts every point with the defaults."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from afdserve.cli import main
from afdserve.planner.roofline import Efficiency, busiest_side
from afdserve.sim.published import (
    Comparison,
    growth_per_tray,
    load_data,
    step3_bundle,
    validate_published,
)


def test_fastafd_points_are_self_consistent() -> None:
    """TPS/GPU x 4(k+1) GPUs x step = 4k workers x b tokens a step, for every quoted point:
    a transcription error in the data file breaks this."""
    data = load_data("fastafd_ratio_sweep")
    assert "linsj20/FastAFD" in data["source"]
    timed = [p for p in data["points"] if p["step_ms"] is not None]
    assert len(timed) >= 50
    for p in timed:
        k, b = p["attention_trays"], p["batch_per_worker"]
        tokens = p["tps_per_gpu"] * 4 * (k + 1) * p["step_ms"] / 1e3
        assert tokens == pytest.approx(4 * k * b, rel=2e-3), p


def test_step3_rows_cite_the_report() -> None:
    data = load_data("step3_table8")
    assert "2507.19427" in data["source"]
    assert [p["tps_per_gpu"] for p in data["points"]] == [4039.0, 2643.0]


def test_a_step3_rows_ffn_nodes_are_one_instance_its_attention_nodes_share() -> None:
    """StepMesh: every attention instance sends to every FFN instance, so 2A2F is 16 attention
    workers over one 16-GPU FFN, and 4A2F 32 over the same 16 (not 8 over each node apart)."""
    data = load_data("step3_table8")
    assert "StepMesh" in data["source_topology"]
    two, four = data["points"]
    a = step3_bundle(data, two, 1, 64, Efficiency())
    b = step3_bundle(data, four, 2, 64, Efficiency())
    assert (a.ratio, a.ffn_devices, a.devices) == (16, 16, 32)
    assert (b.ratio, b.ffn_devices, b.devices) == (32, 16, 48)
    # half the expert weights per FFN GPU of one node holding them all
    one_node = dataclasses.replace(a, ratio=8, ffn_devices=8)
    assert a.costs().ffn.beta == pytest.approx(one_node.costs().ffn.beta / 2)


def test_the_busiest_link_side() -> None:
    assert busiest_side(16, 1, 16) == "B"  # Step-3 2A2F: as many devices each side
    assert busiest_side(32, 1, 16) == "rB"  # 4A2F: the FFN GPUs receive twice as much
    assert busiest_side(1, 8, 8) == "B"


def test_every_point_is_predicted_with_the_documented_defaults() -> None:
    report = validate_published()
    assert report.efficiency == Efficiency()
    points = (*report.step3, *report.fastafd)
    assert len(report.fastafd) == len(load_data("fastafd_ratio_sweep")["points"])
    for c in points:
        assert c.predicted > 0 and math.isfinite(c.predicted), c.label
        assert c.error == pytest.approx(c.predicted / c.published - 1)
    for c in report.fastafd:
        # planner and simulator time the same bundle: within 3% (fill/drain of the pipeline)
        assert c.detail["plan_step_ms"] == pytest.approx(c.detail["step_ms"], rel=0.03)
        assert c.detail["fits"], c.label
        assert c.detail["link"] == "scale-up"  # one NVL72 rack
    for c in report.step3:
        assert c.detail["link"] == "scale-out"  # A and F nodes talk over the NICs
        assert c.detail["step_ms"] <= 50.0
    for row in report.fastafd_rows:
        cs = [c for c in report.fastafd if c.detail["isl"] == row["isl"]]
        at = {c.detail["attention_trays"]: c.predicted for c in cs}
        gap = at[row["best_k_published"]] / at[row["best_k_predicted"]] - 1
        assert row["predicted_at_published_best_vs_best"] == pytest.approx(gap)
        assert gap <= 0 and (gap == 0) == (row["best_k_published"] == row["best_k_predicted"])
        # the growth per added tray is the least-squares slope over the timed points
        timed = [c for c in cs if c.detail["published_step_ms"] is not None]
        k = [c.detail["attention_trays"] for c in timed]
        for key, col in (("published_step_ms", "published"), ("step_ms", "predicted")):
            slope = np.polyfit(k, [c.detail[key] for c in timed], 1)[0]
            assert row[f"step_ms_per_tray_{col}"] == pytest.approx(slope)
        assert row["tokens_per_tray"] == 4 * cs[0].detail["batch_per_worker"]


def test_growth_per_tray_is_the_slope_and_nan_without_two_trays() -> None:
    def point(k: int, t: float) -> Comparison:
        return Comparison("p", 1.0, 1.0, "x", {"attention_trays": k, "step_ms": t})

    line = [point(k, 20.0 + 0.5 * k) for k in (3, 4, 6, 9)]
    assert growth_per_tray(line, "step_ms") == pytest.approx(0.5)
    assert math.isnan(growth_per_tray(line[:1], "step_ms"))
    assert math.isnan(growth_per_tray([point(4, 1.0), point(4, 2.0)], "step_ms"))


def test_the_command_prints_predicted_vs_published(capsys) -> None:
    assert main(["sim-validate", "published"]) == 0
    out = capsys.readouterr().out
    assert "2A2F 4K" in out and "16K A5:F1" in out and "median abs error" in out
    assert "growth per tray across the rows" in out
    assert main(["sim-validate", "published", "--json", "--bw-eff", "0.8"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["efficiency"]["memory_bw"] == 0.8
    # --gemm-latency-us 0 is the plain roofline max: a faster FFN, more tokens for Step-3 at 4K
    assert main(["sim-validate", "published", "--json", "--gemm-latency-us", "0"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["efficiency"]["gemm_latency_ms"] == 0.0
    assert main(["sim-validate", "published", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["efficiency"]["gemm_latency_ms"] == 0.004
    assert plain["step3"][0]["predicted"] > default["step3"][0]["predicted"]
    assert {r["isl"] for r in d["fastafd_rows"]} == {16384, 32768, 65536, 131072}
