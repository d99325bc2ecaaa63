"""Theory against simulation (`afdserve sim-validate theory`): every default case at a CI size,
what each case and the summary report, the text and the plots."""

from __future__ import annotations

import numpy as np
import pytest

from afdserve.planner import traces_dir
from afdserve.sim.plots import plot_theory_validation
from afdserve.sim.render import render_theory
from afdserve.sim.validate_theory import (
    default_coefficient_sets,
    default_workloads,
    validate_theory,
)

HAVE_TRACES = (traces_dir() / "azure_2023_conv.csv").is_file()
pytestmark = pytest.mark.skipif(not HAVE_TRACES, reason="shared traces not found")


@pytest.fixture(scope="module")
def validation():
    """The CI-sized run: all 36 cases (6 coefficient sets x 6 workloads), few steps."""
    return validate_theory(default_coefficient_sets(), default_workloads(), steps=120)


def test_every_case_compares_the_planners_r_with_the_simulated_best(validation) -> None:
    cases = validation.cases
    assert len(cases) >= 24
    workloads = {c.workload for c in cases}
    assert {"azure-conv", "azure-code", "mooncake-conv", "mooncake-synthetic"} <= workloads
    for c in cases:
        sims = {p.r: p.sim_throughput_per_instance for p in c.points}
        assert all(v > 0 for v in sims.values())
        assert c.r_sim == max(sims, key=sims.get)
        # the planner's integers are simulated too, and each gap is what it loses to the best
        assert c.gap_closed_form == pytest.approx(1 - sims[c.r_closed_form] / sims[c.r_sim])
        if c.r_barrier is None:
            assert c.gap_barrier is None
        else:
            assert c.gap_barrier == pytest.approx(1 - sims[c.r_barrier] / sims[c.r_sim])


def test_the_summary_is_the_distribution_of_the_gaps(validation) -> None:
    s = validation.summary()
    assert s["cases"] == len(validation.cases) and s["steps_per_run"] == 120
    for which, key, r_key in (
        ("closed_form", "gap_closed_form", "r_closed_form"),
        ("barrier", "gap_barrier", "r_barrier"),
    ):
        cases = [c for c in validation.cases if getattr(c, key) is not None]
        gaps = np.array([getattr(c, key) for c in cases])
        g = s[which]
        assert g["n"] == len(cases) > 0
        assert (g["min"], g["max"]) == (gaps.min(), gaps.max()) and g["max"] < 1.0
        assert g["median"] == pytest.approx(np.median(gaps))
        assert g["p90"] == pytest.approx(np.quantile(gaps, 0.9))
        assert g["within_10pct"] == pytest.approx(np.mean(gaps <= 0.10))
        assert g["exact_r"] == pytest.approx(np.mean([getattr(c, r_key) == c.r_sim for c in cases]))
    assert validation.to_dict()["summary"] == s


def test_text_has_a_row_per_case_then_the_summary(validation) -> None:
    lines = render_theory(validation).splitlines()
    n = len(validation.cases)
    assert lines[0].split()[:2] == ["coefficients", "workload"]
    for line, c in zip(lines[1 : n + 1], validation.cases, strict=True):
        assert line.startswith(c.coefficients) and f" {c.workload} " in line
    assert [line.split(":")[0] for line in lines[n + 1 :]] == ["closed_form", "barrier"]


def test_plots_one_sweep_per_coefficient_set(validation, tmp_path) -> None:
    plot_theory_validation(validation, tmp_path)
    assert (tmp_path / "theory_gaps.png").is_file()
    sets = {c.coefficients for c in validation.cases}
    assert len(list(tmp_path.glob("sweep_*.png"))) == len(sets)
