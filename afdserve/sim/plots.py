"""Pictures (matplotlib, Agg backend, imported inside the functions):

- `plot_ratio_sweep`: throughput per instance against r, simulated beside the closed form (mean
  field and barrier-aware), and the attention and FFN idle fractions, simulated and closed form;
- `plot_timeline`: a few steps of one bundle, one row per server (each attention worker, its
  links, the FFN), bars coloured by microbatch, so pipelining and barrier stalls show;
- `plot_latency_cdfs`: TTFT, TPOT and ITL distributions of several deployments side by side;
- `plot_gap_histogram`, `plot_theory_grid`: theory against simulation, and
  `plot_theory_validation`, which writes both for a whole `sim-validate theory` run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from afdserve.sim.pipeline import StageTimes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ratio_sweep(
    points: Sequence[Any],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    marks: Mapping[str, float] | None = None,
) -> None:
    """`points`: objects with r, sim/theory/barrier throughput per instance and idle fractions
    (`validate_theory.RatioPoint`). `marks`: vertical lines, e.g. {"r*": 4.7, "r sim": 5}."""
    plt = _pyplot()
    rs = [p.r for p in points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, constrained_layout=True)
    top.plot(rs, [p.sim_throughput_per_instance for p in points], "o-", label="simulated")
    top.plot(
        rs,
        [p.theory_throughput_per_instance for p in points],
        "--",
        label="closed form (mean field)",
    )
    barrier = [p.barrier_throughput_per_instance for p in points]
    if all(b is not None for b in barrier):
        top.plot(rs, barrier, ":", label="closed form (barrier-aware)")
    top.set_ylabel("output tokens/s per instance")
    for i, (name, x) in enumerate((marks or {}).items()):
        top.axvline(x, color=f"C{i + 3}", lw=1, ls="-.", label=f"{name} = {x:.3g}")
    top.legend(loc="best", fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(
        rs, [p.sim_attention_idle for p in points], "o-", color="C0", label="attention idle (sim)"
    )
    bottom.plot(
        rs,
        [p.theory_attention_idle for p in points],
        "--",
        color="C0",
        label="attention idle (closed form)",
    )
    bottom.plot(rs, [p.sim_ffn_idle for p in points], "s-", color="C1", label="FFN idle (sim)")
    bottom.plot(
        rs, [p.theory_ffn_idle for p in points], "--", color="C1", label="FFN idle (closed form)"
    )
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_ylabel("idle fraction")
    bottom.set_xlabel("r (attention instances per FFN instance)")
    bottom.legend(loc="best", fontsize=8)
    bottom.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def job_schedule(st: StageTimes, step: int, num_layers: int, start: float = 0.0) -> list[tuple]:
    """Every job of one step: (server, start, end, microbatch, layer), server being
    ("attention", k), ("A->F", k), ("FFN", 0) or ("F->A", k); the same recurrence as
    `pipeline.microbatch_makespan`, job by job."""
    a, f = st.attention[step], st.ffn[step]
    sends = st.sends[step]
    r, G = a.shape
    shared = st.shared_link
    up = st.up[step]
    neg = -math.inf
    a_free = [start] * r
    u_free = [start] * r
    u_sh = start
    f_free = start
    d_free = [start] * r
    d_sh = start
    d_in = [[start] * G for _ in range(r)]
    jobs: list[tuple] = []
    for layer in range(num_layers):
        for i in range(G):
            ready = neg
            for k in range(r):
                if not sends[k, i]:
                    continue
                s0 = max(a_free[k], d_in[k][i])
                a_free[k] = s0 + a[k, i]
                jobs.append((("attention", k), s0, a_free[k], i, layer))
                if shared:
                    ready = max(ready, a_free[k])
                else:
                    s1 = max(u_free[k], a_free[k])
                    u_free[k] = s1 + up[k, i]
                    jobs.append((("A->F", k), s1, u_free[k], i, layer))
                    ready = max(ready, u_free[k])
            if ready == neg:
                continue
            if shared:
                s1 = max(u_sh, ready)
                u_sh = s1 + up[i]
                jobs.append((("A->F", 0), s1, u_sh, i, layer))
                ready = u_sh
            s2 = max(f_free, ready)
            f_free = s2 + f[i]
            jobs.append((("FFN", 0), s2, f_free, i, layer))
            if shared:
                s3 = max(d_sh, f_free)
                d_sh = s3 + up[i]
                jobs.append((("F->A", 0), s3, d_sh, i, layer))
            for k in range(r):
                if sends[k, i]:
                    if shared:
                        d_in[k][i] = d_sh
                    else:
                        s3 = max(d_free[k], f_free)
                        d_free[k] = s3 + up[k, i]
                        d_in[k][i] = d_free[k]
                        jobs.append((("F->A", k), s3, d_free[k], i, layer))
    end = max((j[2] for j in jobs), default=start)
    for k in range(r):
        if st.post[step, k] > 0:
            last = max(
                (j[2] for j in jobs if j[0] == ("F->A", k) or j[0] == ("F->A", 0)), default=start
            )
            jobs.append((("attention", k), last, last + st.post[step, k], -1, -1))
            end = max(end, last + st.post[step, k])
    return jobs


def plot_timeline(
    stages: StageTimes,
    num_layers: int,
    path: str | os.PathLike[str],
    *,
    steps: int = 2,
    title: str = "",
) -> None:
    """Gantt chart of the first `steps` steps (each starts when the previous one's slowest
    worker is done: the barrier). Grey bars: per-step work outside the layers."""
    plt = _pyplot()
    n = min(steps, stages.attention.shape[0])
    t0 = 0.0
    all_jobs: list[tuple] = []
    bounds = []
    for s in range(n):
        jobs = job_schedule(stages, s, num_layers, t0)
        end = max(j[2] for j in jobs) if jobs else t0
        bounds.append((t0, end))
        all_jobs.extend(jobs)
        t0 = end
    servers = sorted({j[0] for j in all_jobs}, key=_server_order)
    row = {s: i for i, s in enumerate(servers)}
    height = max(3.0, 0.45 * len(servers) + 1.5)
    fig, ax = plt.subplots(figsize=(12, height), constrained_layout=True)
    G = stages.attention.shape[2]
    cmap = plt.get_cmap("tab10")
    for server, s0, s1, mb, _layer in all_jobs:
        color = "0.6" if mb < 0 else cmap(mb % 10)
        ax.barh(row[server], s1 - s0, left=s0, height=0.7, color=color, edgecolor="none")
    for _start, b1 in bounds:
        ax.axvline(b1, color="k", lw=0.8, ls="--")
    ax.set_yticks(range(len(servers)))
    ax.set_yticklabels([f"{s[0]} {s[1]}" if s[0] != "FFN" else "FFN" for s in servers])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms); dashed: step ends (barrier)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i % 10)) for i in range(G)]
    labels = [f"microbatch {i}" for i in range(G)]
    handles.append(plt.Rectangle((0, 0), 1, 1, color="0.6"))
    labels.append("per-step work")
    ax.legend(
        handles,
        labels,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        fontsize=8,
        ncol=min(len(labels), 6),
        frameon=False,
    )
    fig.suptitle(title or f"{n} steps, {num_layers} layers", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _server_order(s: tuple[str, int]) -> tuple[int, int]:
    kind = {"attention": 0, "A->F": 1, "FFN": 2, "F->A": 3}[s[0]]
    return (0, s[1] * 4 + kind) if s[0] != "FFN" else (1, 0)


def plot_latency_cdfs(
    samples: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    slo: Mapping[str, float | None] | None = None,
    title: str = "",
) -> None:
    """`samples`: label -> {"ttft": [ms], "tpot": [ms], "itl": ([ms], [weights])}."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), constrained_layout=True)
    for ax, key, name in zip(axes, ("ttft", "tpot", "itl"), ("TTFT", "TPOT", "ITL"), strict=True):
        for j, (label, d) in enumerate(samples.items()):
            v = d.get(key)
            if v is None:
                continue
            if key == "itl":
                vals, w = np.asarray(v[0], float), np.asarray(v[1], float)
            else:
                vals = np.asarray(v, float)
                w = np.ones_like(vals)
            keep = np.isfinite(vals) & (w > 0)
            vals, w = vals[keep], w[keep]
            if vals.size == 0:
                continue
            order = np.argsort(vals)
            cdf = np.cumsum(w[order]) / w.sum()
            ax.plot(vals[order], cdf, color=f"C{j}", label=label if key == "ttft" else None)
        lim = (slo or {}).get(f"{key}_ms") if key != "itl" else None
        if lim:
            ax.axvline(lim, color="k", ls="--", lw=1, label="SLO")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{name} (ms, log scale)")
        ax.set_ylabel("fraction")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncol=min(len(labels), 2))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gap_histogram(
    gaps: Mapping[str, np.ndarray], path: str | os.PathLike[str], *, title: str = ""
) -> None:
    """Distribution of the theory-vs-simulation throughput gaps (one series per rule)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    hi = max((float(np.max(g)) for g in gaps.values() if len(g)), default=0.1)
    bins = np.linspace(0, max(hi, 0.1) * 1.05, 25)
    for label, g in gaps.items():
        ax.hist(np.asarray(g) * 100, bins=bins * 100, alpha=0.55, label=f"{label} (n={len(g)})")
    ax.axvline(5, color="k", ls=":", lw=1)
    ax.axvline(10, color="k", ls="--", lw=1)
    ax.set_xlabel("throughput lost against the simulated optimum (%)")
    ax.set_ylabel("cases")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_samples(runs: Sequence[Any]) -> dict[str, Any]:
    """TTFT and TPOT per finished request and weighted ITL samples of a deployment's runs."""
    arrival = np.concatenate([r.arrival for r in runs])
    first = np.concatenate([r.first_token for r in runs])
    finish = np.concatenate([r.finish for r in runs])
    out = np.concatenate([r.output_len for r in runs])
    warm = np.concatenate([r.warm for r in runs])
    done = ~warm & np.isfinite(first) & np.isfinite(finish)
    multi = done & (out > 1)
    itl_v = [r.step_duration for r in runs] + [r.extra_itl[0] for r in runs if r.extra_itl]
    itl_w = [r.itl_tokens for r in runs] + [r.extra_itl[1] for r in runs if r.extra_itl]
    return {
        "ttft": first[done] - arrival[done],
        "tpot": (finish[multi] - first[multi]) / (out[multi] - 1),
        "itl": (np.concatenate(itl_v), np.concatenate(itl_w)),
    }


def plot_theory_grid(
    cases: Sequence[Any], path: str | os.PathLike[str], *, title: str = ""
) -> None:
    """One panel per case (`validate_theory.CaseResult`): simulated throughput per instance
    against r beside the closed form (mean field and barrier-aware), each normalised to its own
    maximum, with the closed-form, barrier-aware and simulated best r marked."""
    plt = _pyplot()
    n = len(cases)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5 * cols, 3.2 * rows), constrained_layout=True, squeeze=False
    )
    for ax, c in zip(axes.ravel(), cases, strict=False):
        pts = [p for p in c.points if p.r <= max(16, 2 * c.r_sim)]
        rs = [p.r for p in pts]

        def norm(vals: list[float]) -> list[float]:
            top = max(vals)
            return [v / top for v in vals]

        ax.plot(
            rs, norm([p.sim_throughput_per_instance for p in pts]), "o-", ms=3, label="simulated"
        )
        ax.plot(rs, norm([p.theory_throughput_per_instance for p in pts]), "--", label="mean field")
        bar = [p.barrier_throughput_per_instance for p in pts]
        if all(b is not None for b in bar):
            ax.plot(rs, norm(bar), ":", label="barrier-aware")
        ax.axvline(c.r_closed_form, color="C1", lw=1, alpha=0.6)
        if c.r_barrier is not None:
            ax.axvline(c.r_barrier, color="C2", lw=1, alpha=0.6, ls=":")
        ax.axvline(c.r_sim, color="C0", lw=1, alpha=0.6)
        gap = f"gap {c.gap_closed_form:.1%}"
        if c.gap_barrier is not None:
            gap += f" / {c.gap_barrier:.1%}"
        ax.set_title(f"{c.workload}: r* {c.r_star:.1f}, sim best {c.r_sim} ({gap})", fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.set_xlabel("r")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel("throughput / its maximum")
    axes[0][0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_theory_validation(v: Any, out: Path) -> None:
    """The pictures of a `validate_theory.TheoryValidation` in `out`: theory_gaps.png (the gap
    histogram of both rules) and one sweep_<coefficients>.png per coefficient set, a panel per
    workload: a set's cases share their costs and B, so its panels differ by workload alone."""
    out.mkdir(parents=True, exist_ok=True)
    plot_gap_histogram(
        {"closed form": v.gaps("closed_form"), "barrier-aware": v.gaps("barrier")},
        out / "theory_gaps.png",
        title=f"theory vs simulation, {len(v.cases)} cases ({v.steps} steps a run)",
    )
    by_set: dict[str, list[Any]] = {}
    for c in v.cases:
        by_set.setdefault(c.coefficients, []).append(c)
    for name, cases in by_set.items():
        fname = "sweep_" + name.replace("/", "_").replace("+", "_") + ".png"
        plot_theory_grid(
            cases,
            out / fname,
            title=f"{name} (B = {cases[0].batch}): simulated vs closed-form throughput per "
            "instance; lines: r closed form (orange), barrier-aware (green), simulated (blue)",
        )
