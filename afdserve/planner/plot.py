"""`afdserve plan --plot FILE.png`: throughput and idle fractions against r, with r_A, r_C,
r_peak and r* marked. matplotlib is imported inside the function (Agg backend, no display)."""

from __future__ import annotations

import math
import os

from afdserve.errors import UserInputError
from afdserve.planner.plan import PlanResult


def plot_plan(result: PlanResult, path: str | os.PathLike[str], title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [row.r for row in result.table]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, constrained_layout=True)
    # the objective the plan maximises: per instance, or per unit of cost (device, $/h)
    unit = result.weights.unit
    top.plot(rs, [row.throughput_per_cost for row in result.table], "o-", label="mean field")
    if result.workload.sigma2 is not None:
        top.plot(
            rs,
            [row.throughput_per_cost_barrier for row in result.table],
            "s--",
            label="barrier-aware",
        )
    top.set_ylabel(f"throughput per {unit} (tokens/ms)")
    bottom.plot(rs, [row.attention_idle for row in result.table], "o-", label="attention idle")
    bottom.plot(rs, [row.ffn_idle for row in result.table], "s-", label="FFN idle")
    bottom.set_ylabel("idle fraction of the cycle")
    bottom.set_xlabel("r (attention instances per FFN instance)")
    bottom.set_ylim(-0.02, 1.02)

    r_hi = rs[-1] + 0.5
    # r* first and wider, so r_A / r_C / r_peak stay visible when one of them equals it
    marks = (
        ("r*", result.r_star, "black", "--", 2.4),
        ("r_A", result.r_a, "tab:red", ":", 1.4),
        ("r_C", result.r_c, "tab:purple", ":", 1.4),
        ("r_peak", result.r_peak, "tab:green", "-.", 1.4),
    )
    for ax in (top, bottom):
        for label, value, color, style, width in marks:
            if math.isfinite(value) and 0 < value <= r_hi:
                ax.axvline(
                    value,
                    color=color,
                    linestyle=style,
                    linewidth=width,
                    label=f"{label} = {value:.3g}" if ax is top else None,
                )
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0.5, r_hi)
    if result.r_int is not None:
        best = result.row(result.r_int)
        top.plot(
            [best.r],
            [best.throughput_per_cost],
            "*",
            color="tab:red",
            markersize=16,
            zorder=5,
            label=f"best r = {best.r} (mean field)",
        )
    if result.r_int_barrier is not None:
        best = result.row(result.r_int_barrier)
        top.plot(
            [best.r],
            [best.throughput_per_cost_barrier],
            "P",
            color="tab:brown",
            markersize=12,
            zorder=5,
            label=f"best r = {best.r} (barrier)",
        )
    top.legend(loc="best", fontsize=8)
    bottom.legend(loc="best", fontsize=8)
    head = title or f"rA-1F plan: B = {result.batch}, theta = {result.theta:.1f}"
    top.set_title(head)
    try:
        fig.savefig(os.fspath(path), dpi=110)
    except (OSError, ValueError) as exc:
        msg = getattr(exc, "strerror", None) or exc
        raise UserInputError(f"cannot write plot {os.fspath(path)!r} ({msg})") from None
    finally:
        plt.close(fig)
