"""The design-space search on a small space: the best of each family under the SLOs, its text
and its plots (`afdserve simulate` without --ratio)."""

from __future__ import annotations

import pytest

from afdserve.planner import traces_dir
from afdserve.sim.metrics import SLO
from afdserve.sim.render import render_search
from afdserve.sim.search import FAMILIES, SearchSpace, search
from afdserve.sim.search_plots import plot_search

HAVE_TRACES = (traces_dir() / "azure_2023_conv.csv").is_file()
pytestmark = pytest.mark.skipif(not HAVE_TRACES, reason="shared traces not found")

SLOS = SLO(ttft_ms=3000, tpot_ms=100)
SPACE = SearchSpace(ratios=(1, 2), microbatches=(1, 2), batches=(32,), finalists=1)


@pytest.fixture(scope="module")
def result():
    return search("llama-3.1-8b", "h100", 3, "azure-conv", SLOS, space=SPACE, requests=60)


def test_the_best_of_each_family_meets_the_slos_on_the_devices_given(result) -> None:
    assert list(result.best) == list(FAMILIES)
    for fam, best in result.best.items():
        assert best is not None, fam
        assert best.family == fam and best.devices <= 3
        rep = best.report
        assert rep.slo_attainment >= SPACE.attainment
        assert rep.tpot_ms.p90 <= SLOS.tpot_ms and rep.ttft_ms.p90 <= SLOS.ttft_ms
        assert rep.goodput_tok_s > 0
        assert rep.tokens_per_user_s == pytest.approx(1e3 / rep.tpot_ms.mean)
    d = result.to_dict()
    for fam, best in result.best.items():
        per_device = d["best"][fam]["goodput_tok_s_per_device"]
        assert per_device == pytest.approx(best.report.goodput_tok_s / best.devices)


def test_the_text_has_a_row_per_family(result) -> None:
    lines = render_search(result).splitlines()
    assert lines[0].startswith("llama-3.1-8b on 3 x h100, workload azure-conv")
    assert f"({len(result.screened)} candidates screened)" in lines[0]
    rows = lines[3 : 3 + len(FAMILIES)]
    assert [row.split()[0] for row in rows] == list(FAMILIES)
    for row, best in zip(rows, result.best.values(), strict=True):
        assert row.endswith(f"{best.describe()} @ {best.max_rate:.3g} req/s")
    assert lines[3 + len(FAMILIES) :] == [f"note: {n}" for n in result.notes]


def test_plots_of_the_search(result, tmp_path) -> None:
    plot_search(result, tmp_path)
    for png in ("latency_cdf.png", "ratio_sweep.png", "timeline.png"):
        assert (tmp_path / png).stat().st_size > 10_000
