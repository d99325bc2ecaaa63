"""The text `afdserve plan` and `afdserve workload` print without `--json`, and the JSON hook
both packages' verbs share: one function per output, returning the whole text, so that what a
reader sees can be tested without running a command.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from afdserve.planner.costs import StageCosts
    from afdserve.planner.plan import PlanResult
    from afdserve.planner.stats import WorkloadStats


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` for results computed with numpy: its scalars and arrays become
    Python numbers and lists (`tolist` does both, without importing numpy here)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fmt(v: float | None, digits: int = 4) -> str:
    """A number in `digits` significant digits; '-' for none, 'inf' / '-inf' for unbounded."""
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "-inf" if v < 0 else "inf"
    return f"{v:.{digits}g}"


def plan_title(result: PlanResult, extra: dict[str, Any]) -> str:
    """B, theta and the workload, under the model and each side's hardware if it has them
    (`extra`: `RooflineDeployment.to_dict()`, or empty)."""
    head = f"B = {result.batch}, theta = {result.theta:.1f} ({result.workload.source})"
    if "model" in extra:
        hw = extra["hardware"]
        head = (
            f"{extra['model']['name']}: attention {hw['attention']['devices']}x"
            f"{hw['attention']['name']}, FFN {hw['ffn']['devices']}x{hw['ffn']['name']}\n{head}"
        )
    return head


def render_plan(result: PlanResult, extra: dict[str, Any]) -> str:
    """The inputs (workload, per-layer costs), the closed-form ratios, the best integer r and
    what constrains it, then the table of every r with the best marked."""
    c = result.costs
    w = result.workload
    lines = []
    if "model" in extra:
        lines.append(plan_title(result, extra).split("\n")[0])
        lines.extend(f"  note: {n}" for n in extra["sizing_notes"])
        if extra.get("expert_parallel") is not None:
            lines.append(render_expert_parallel(extra["expert_parallel"]))
    lines.append(
        f"workload: {w.source}: theta = {w.theta:.1f} tokens/slot"
        + (f", sigma_X^2 = {w.sigma2:.6g}" if w.sigma2 is not None else "")
    )
    lines.append(
        f"costs ({c.source}, ms per layer, {c.num_layers} layer(s)/step): "
        f"attention {fmt(c.attention.alpha)}*T + {fmt(c.attention.beta)}, "
        + (
            f"FFN max({fmt(c.ffn.alpha)}*n, {fmt(c.ffn.beta)}) + {fmt(c.ffn.fixed)}, "
            if c.ffn.combine == "max"
            else f"FFN {fmt(c.ffn.alpha)}*n + {fmt(c.ffn.beta)}"
            + (f" + {fmt(c.ffn.fixed)}, " if c.ffn.fixed else ", ")
        )
        + _comm_text(c)
    )
    lines.append(
        f"B = {result.batch}: r_A = {fmt(result.r_a)}, r_C = {fmt(result.r_c)}, "
        f"r_peak = {fmt(result.r_peak)}, r* = {fmt(result.r_star)}"
    )
    M = result.pipeline_microbatches
    lines.append(
        f"cycle: {M} ping-pong microbatch(es) a layer, each paying the fixed costs "
        "(the FFN's weight read once per microbatch), as `afdserve simulate` times them"
        if M is not None
        else "cycle: ideal overlap, fixed costs once a layer (optimistic by (M-1) * beta "
        "per stage at M microbatches; pass --microbatches M to time the pipeline)"
    )
    obj = result.weights
    lines.append(
        f"best integer r: {result.r_int if result.r_int is not None else 'none feasible'}"
        f" (mean field; closed form gives {result.r_int_unconstrained})"
        + (f", barrier-aware: {result.r_int_barrier}" if w.sigma2 is not None else "")
        + f"; objective: throughput per {obj.unit}"
        + (f" (attention {obj.attention:g}, FFN {obj.ffn:g})" if obj.unit != "instance" else "")
    )
    if result.microbatches is not None:
        mb = result.microbatches
        lines.append(
            f"microbatches to hide communication: {mb.microbatches} (T_c/T_f = {mb.tc_over_tf:.3g})"
        )
    if result.memory is not None:
        m = result.memory
        lines.append(
            f"memory: attention {m.attention_bytes / 1e9:.1f}/{m.attention_capacity_bytes / 1e9:.1f} GB"
            f" ({'ok' if m.attention_ok else 'DOES NOT FIT'}, max B {m.max_batch}), "
            f"FFN {m.ffn_bytes / 1e9:.1f}/{m.ffn_capacity_bytes / 1e9:.1f} GB "
            f"({'ok' if m.ffn_ok else 'DOES NOT FIT'})"
        )
    if result.tpot_slo_ms is not None:
        lines.append(f"TPOT SLO: {result.tpot_slo_ms:g} ms per step")
    lines.extend(f"note: {n}" for n in result.notes)
    barrier = w.sigma2 is not None
    header = ["r", "t_A", "t_F", "t_C", "tau", "step", "thr/inst", "A idle", "F idle"]
    if obj.unit != "instance":
        header.append(f"thr/{obj.unit}")
    if barrier:
        header += ["E[tau]", "thr/inst(b)"]
    header.append("ok")
    table = [header]
    for row in result.table:
        cells = [
            str(row.r),
            fmt(row.t_attention),
            fmt(row.t_ffn),
            fmt(row.t_comm),
            fmt(row.cycle_ms),
            fmt(row.step_ms),
            fmt(row.throughput_per_instance),
            f"{row.attention_idle:.2f}",
            f"{row.ffn_idle:.2f}",
        ]
        if obj.unit != "instance":
            cells.append(fmt(row.throughput_per_cost))
        if barrier:
            cells += [fmt(row.expected_cycle_ms), fmt(row.throughput_per_instance_barrier)]
        mark = "yes" if row.feasible else "no"
        if row.r == result.r_int:
            mark += " <- best"
        cells.append(mark)
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines.append("times in ms (per layer; step = all layers), throughput in tokens/ms:")
    for r in table:
        lines.append("  ".join(cell.rjust(wd) for cell, wd in zip(r, widths, strict=True)))
    return "\n".join(lines)


def render_expert_parallel(ep: dict[str, Any]) -> str:
    """One line: what a MoE roofline assumed about expert parallelism
    (`deployment.expert_parallel_summary`)."""
    capped = ep["expert_imbalance"] != ep["expert_imbalance_given"]
    return (
        f"expert parallelism: {ep['ffn_devices']} FFN device(s), a token reaches "
        f"{ep['fanout']:.3g} of them (expected, top-{ep['top_k']} of {ep['num_experts']} "
        f"experts); expert imbalance {ep['expert_imbalance']:g} (max/mean"
        + (
            f", {ep['expert_imbalance_given']:g} given, capped at the device count"
            if capped
            else ""
        )
        + f"), {ep['redundant_experts']} redundant experts "
        f"({ep['slots_per_device']:.4g} expert slots a device)"
    )


def render_workload(rows: Sequence[WorkloadStats]) -> str:
    """A row per workload: its size, mean prompt and output, the naive P + D/2 beside theta (the
    step-weighted context the planner uses) and sigma_X, then what theta means."""
    header = ["workload", "requests", "mean P", "mean D", "P + D/2", "theta", "sigma_X"]
    table = [header]
    for s in rows:
        naive = None
        if s.mean_prompt is not None and s.mean_output is not None:
            naive = s.mean_prompt + s.mean_output / 2
        table.append(
            [
                s.source,
                "-" if s.num_requests is None else str(s.num_requests),
                fmt(s.mean_prompt, 6),
                fmt(s.mean_output, 6),
                fmt(naive, 6),
                f"{s.theta:.1f}",
                fmt(None if s.sigma2 is None else math.sqrt(s.sigma2), 6),
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(wd) if i == 0 else cell.rjust(wd)
            for i, (cell, wd) in enumerate(zip(r, widths, strict=True))
        )
        for r in table
    ]
    lines.append(
        "theta = sum(D*P + D*(D-1)/2) / sum(D): context tokens per decode slot, step-weighted"
    )
    return "\n".join(lines)


def _comm_text(c: StageCosts) -> str:
    """The communication term as the plan prints it."""
    if c.comm_ffn is None:
        return f"comm {fmt(c.comm.alpha)}*{c.comm_scales_with} + {fmt(c.comm.beta)}"
    a, f = c.comm, c.comm_ffn
    if a.beta == f.beta:
        return f"comm max({fmt(a.alpha)}*B, {fmt(f.alpha)}*rB) + {fmt(a.beta)}"
    return f"comm max({fmt(a.alpha)}*B + {fmt(a.beta)}, {fmt(f.alpha)}*rB + {fmt(f.beta)})"
