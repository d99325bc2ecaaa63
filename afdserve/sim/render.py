"""The text the simulator's verbs print without `--json`: one function per result, returning the
whole text, so that what a reader sees can be tested without running a command.

`render_profile` and `render_runtime` format the calibration's results (`afdserve profile`,
`sim-validate runtime`) by their keys and attributes alone: importing `afdserve.calibration`
here would load torch into the simulator.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from afdserve.sim.metrics import LatencyStats, SimReport
    from afdserve.sim.search import SearchResult
    from afdserve.sim.validate_theory import TheoryValidation


def render_search(result: SearchResult) -> str:
    """The best deployment of each family under the SLOs, one row each, then the search's notes."""
    lines = [
        f"{result.model} on {result.devices} x {result.hardware}, workload {result.workload}: "
        f"SLO TTFT <= {result.slo.ttft_ms} ms, TPOT <= {result.slo.tpot_ms} ms for "
        f"{result.space.attainment:.0%} of requests ({len(result.screened)} candidates screened)",
        "",
        f"{'family':<12} {'devices':>7} {'goodput tok/s':>13} {'per device':>10} "
        f"{'tok/s/user':>10} {'TTFT p90':>9} {'TPOT p90':>9} {'attain':>6}  configuration",
    ]
    for fam, c in result.best.items():
        if c is None or c.report is None:
            lines.append(f"{fam:<12} {'-':>7}  no configuration meets the SLOs")
            continue
        rep = c.report
        lines.append(
            f"{fam:<12} {c.devices:>7d} {rep.goodput_tok_s or 0:>13.0f} "
            f"{(rep.goodput_tok_s or 0) / c.devices:>10.0f} {rep.tokens_per_user_s:>10.1f} "
            f"{rep.ttft_ms.p90:>9.1f} {rep.tpot_ms.p90:>9.2f} {rep.slo_attainment or 0:>6.2f}  "
            f"{c.describe()} @ {c.max_rate:.3g} req/s"
        )
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def render_report(rep: SimReport) -> str:
    """One simulated deployment: its size, throughput, idle fractions and latency percentiles."""

    def lat(s: LatencyStats) -> str:
        return f"mean {s.mean:.4g}  median {s.median:.4g}  p90 {s.p90:.4g}  p99 {s.p99:.4g} ms"

    lines = [
        f"{rep.label}: {rep.steps} steps, {rep.requests_finished} requests finished "
        f"({rep.unfinished} unfinished), {rep.span_s:.4g} s simulated in {rep.wall_s:.3g} s "
        f"({rep.speed:.0f}x real time)",
        f"throughput {rep.throughput_tok_s:.5g} tok/s, {rep.throughput_per_instance:.5g} per instance",
        f"idle: attention {rep.attention_idle:.3f}, FFN {'-' if rep.ffn_idle is None else f'{rep.ffn_idle:.3f}'}",
        f"TTFT {lat(rep.ttft_ms)}",
        f"TPOT {lat(rep.tpot_ms)}",
        f"ITL  {lat(rep.itl_ms)}",
    ]
    if rep.slo_attainment is not None:
        lines.append(
            f"SLO attainment {rep.slo_attainment:.3f}, goodput {rep.goodput_tok_s:.5g} tok/s"
        )
    return "\n".join(lines)


def render_theory(v: TheoryValidation) -> str:
    """A row per case (the planner's r beside the simulated best, and what each rule loses),
    then each rule's gap distribution."""
    lines = [
        f"{'coefficients':<28} {'workload':<19} {'r*':>7} {'r_cf':>4} {'r_bar':>5} {'r_sim':>5} "
        f"{'gap_cf':>7} {'gap_bar':>7}"
    ]
    for c in v.cases:
        gb = "-" if c.gap_barrier is None else f"{c.gap_barrier:.3f}"
        rb = "-" if c.r_barrier is None else str(c.r_barrier)
        lines.append(
            f"{c.coefficients:<28} {c.workload:<19} {c.r_star:>7.2f} {c.r_closed_form:>4d} "
            f"{rb:>5} {c.r_sim:>5d} {c.gap_closed_form:>7.3f} {gb:>7}"
        )
    s = v.summary()
    for which in ("closed_form", "barrier"):
        if which in s:
            g = s[which]
            lines.append(
                f"{which}: gap median {g['median']:.3f}, p90 {g['p90']:.3f}, max {g['max']:.3f}; "
                f"within 5%: {g['within_5pct']:.0%}, within 10%: {g['within_10pct']:.0%}, "
                f"same r: {g['exact_r']:.0%} ({g['n']} cases, {v.steps} steps a run)"
            )
    return "\n".join(lines)


def render_profile(d: dict[str, Any], out: Path) -> str:
    """A profile (`afdserve.calibration.profile.run_profile`) written to `out`: each stage's
    fit and its quality, the prefill terms, warnings, and what each transport costs."""
    lines = [
        f"{d['model']} on {d['device']}, {d['num_layers']} layers, {d['dtype']}: "
        f"profiled in {d['wall_s']:.1f} s -> {out}",
        f"{'stage':<22} {'alpha':>12} {'beta (ms)':>12} {'R^2':>7} {'max rel err':>11}",
    ]
    for key, label in (
        ("attention", "attention (ms/ctx tok)"),
        ("ffn", "ffn (ms/token)"),
        ("comm", "comm (ms/token)"),
        ("step", "step (ms/sequence)"),
    ):
        e = d[key]
        lines.append(
            f"{label:<22} {e['alpha']:>12.4e} {e['beta']:>12.4e} {e.get('r2', float('nan')):>7.3f} "
            f"{e.get('max_rel_err', float('nan')):>11.3f}"
        )
    pre = d["prefill"]
    lines.append(
        f"prefill: {pre['token_ms']:.4e} ms/token + {pre['pair_ms']:.4e} ms/pair "
        f"(R^2 {pre['r2']:.3f}, max rel err {pre['max_rel_err']:.3f}); AFD step extra "
        f"{d['step'].get('afd_beta', 0.0):.4g} ms"
    )
    for w in d.get("warnings", []):
        lines.append(f"warning: {w}")
    for name, t in d["transport"].items():
        if "alpha" in t:
            lines.append(f"transport {name:<6} {t['alpha']:.4e} ms/token + {t['beta']:.4e} ms")
            if "afd_beta" in t:
                lines.append(
                    f"  worker-process AFD step extra over {name}: {t['afd_alpha']:.4g} ms/sequence"
                    f" + {t['afd_beta']:.4g} ms"
                )
            elif "worker_step_skipped" in t:
                lines.append(f"  worker-process steps skipped: {t['worker_step_skipped']}")
        else:
            lines.append(f"transport {name:<6} skipped: {t['skipped']}")
    return "\n".join(lines)


def render_runtime(v: Any) -> str:
    """A runtime validation (`afdserve.calibration.validate_runtime.RuntimeValidation`): per
    run, real against simulated step time and tokens/s, the machine's load, and for AFD runs
    the serial pipeline's prediction."""
    w = v.workload
    lines = [
        f"{v.model} on {v.device}: {w.requests} requests x (prompt {w.prompt_len}, "
        f"output {w.output_len})",
        f"{'run':<26} {'real ms/step':>12} {'sim ms/step':>11} {'error':>7} {'real tok/s':>10} "
        f"{'sim tok/s':>9} {'error':>7} {'load':>5} {'serial ms':>9} {'error':>7}",
    ]
    for r in v.runs:
        lines.append(
            f"{r.run:<26} {r.real_step_ms:>12.3f} {r.sim_step_ms:>11.3f} {r.step_ms_error:>+7.1%} "
            f"{r.real_tokens_per_s:>10.0f} {r.sim_tokens_per_s:>9.0f} {r.tokens_per_s_error:>+7.1%} "
            f"{r.load_average:>5.2f} "
            + (
                f"{r.sim_serial_step_ms:>9.3f} {r.serial_step_ms_error:>+7.1%}"
                if r.sim_serial_step_ms is not None
                else f"{'-':>9} {'-':>7}"
            )
        )
    return "\n".join(lines)


def render_published(report: Any, tuned: bool = False) -> str:
    """Predicted vs published, one table per source, with the error (predicted / published - 1)
    and, per FastAFD context row, the median |error| and the best k."""
    e = report.efficiency
    lines = [
        f"efficiencies: flops {e.flops:g}, memory bandwidth {e.memory_bw:g}, link {e.link:g}, "
        f"link latency {e.link_latency_ms:g} ms, GEMM latency {e.gemm_latency_ms * 1e3:g} us, "
        f"MoE FFN flops {e.ffn_flops_for(True):g}, "
        f"FFN {e.ffn_combine_for(False)}(compute, weights) dense, "
        f"{e.ffn_combine_for(True)}(compute, weights) MoE"
        + (" (NOT the documented defaults: a sensitivity run)" if tuned else " (defaults)"),
        "",
        "Step-3 (arXiv 2507.19427, Table 8), H800, FP8, 50 ms TPOT:",
        "| deployment | published tok/s/GPU | predicted | error | batch/GPU | sim step ms "
        "| plan step ms | planner best A:F | deployed A:F |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, r in zip(report.step3, report.step3_ratio, strict=True):
        d = c.detail
        lines.append(
            f"| {c.label} | {c.published:,.0f} | {c.predicted:,.0f} | {c.error:+.1%} | "
            f"{d.get('batch_per_gpu', '-')} | {d.get('step_ms', float('nan')):.1f} | "
            f"{d.get('plan_step_ms', float('nan')):.1f} | {r['planner_best_ratio']} | "
            f"{r['deployed_ratio']} |"
        )
    lines += [
        "",
        "FastAFD A:F sweep (Qwen3-235B-A22B-FP8, GB200 NVL72, 1 FFN tray), per context row:",
        "| ISL | points | median abs error | within 10% | best k published | best k predicted "
        "| predicted at the published best k, vs its best "
        "| step ms per added tray: published / predicted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report.fastafd_rows:
        lines.append(
            f"| {row['isl'] // 1024}K | {row['points']} | {row['median_abs_error']:.1%} | "
            f"{row['within_10pct']} / {row['points']} | {row['best_k_published']} | "
            f"{row['best_k_predicted']} | {row['predicted_at_published_best_vs_best']:+.1%} | "
            f"{row['step_ms_per_tray_published']:.2f} / {row['step_ms_per_tray_predicted']:.2f} |"
        )
    lines.append(_growth_across_rows(report.fastafd_rows))
    lines += [
        "",
        "| point | published tok/s/GPU | predicted | error | published step ms | sim step ms |",
        "|---|---|---|---|---|---|",
    ]
    for c in report.fastafd:
        d = c.detail
        pub = d["published_step_ms"]
        lines.append(
            f"| {c.label} | {c.published:,.1f} | {c.predicted:,.1f} | {c.error:+.1%} | "
            f"{'-' if pub is None else f'{pub:.2f}'} | {d['step_ms']:.2f} |"
        )
    lines += ["", *(f"note: {x}" for x in report.extras)]
    lines += [f"source ({k}): {v}" for k, v in report.sources.items()]
    return "\n".join(lines)


def _growth_across_rows(rows: Any) -> str:
    """The per-tray growth over the rows as a line in the tokens a tray adds to a step."""
    x = np.array([r["tokens_per_tray"] for r in rows], dtype=float)
    lines = []
    for col in ("published", "predicted"):
        y = np.array([r[f"step_ms_per_tray_{col}"] for r in rows], dtype=float)
        per_token, fixed = np.polyfit(x, y, 1)
        lines.append(f"{col} {fixed:.3f} ms + {per_token * 1e3:.2f} us a token")
    return "growth per tray across the rows (tokens a tray adds to a step): " + "; ".join(lines)
