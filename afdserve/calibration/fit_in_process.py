"""Fitting the in-process points (`measure_in_process`) into the profile's coefficients: the
attention and FFN lines, the prefill terms, the per-step work, and warnings where a fit says
little.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from afdserve.sim.fit import AffineFit, fit_affine, fit_nonneg, quality

POOR_FIT_R2 = 0.5
"""Below this R^2 a stage's time barely follows its size, and the profile says so."""


def fit_layers(
    attn_pts: list[tuple], ffn_pts: list[tuple], pre_pts: list[tuple]
) -> tuple[AffineFit, AffineFit, dict[str, float], list[str]]:
    """(attention fit, FFN fit, prefill terms, warnings) from the attention decode, FFN and
    attention prefill points. An FFN whose time does not grow over the grid gets a floor slope
    (the planner needs one), with a warning."""
    a = np.asarray(attn_pts, dtype=np.float64)
    attn_fit = fit_affine(a[:, 2], a[:, 3])
    f = np.asarray(ffn_pts, dtype=np.float64)
    ffn_fit = fit_affine(f[:, 0], f[:, 1])
    warnings: list[str] = []
    ffn_flat = ffn_fit.alpha <= 0
    if ffn_flat:
        # the planner needs the FFN to grow with its batch; below the timer's resolution, take
        # a 0.1% rise over the grid and say so
        floor = 1e-3 * max(ffn_fit.beta, 1e-6) / float(f[:, 0].max())
        warnings.append(
            f"FFN time did not grow over {int(f[:, 0].min())}..{int(f[:, 0].max())} tokens; "
            f"alpha_F set to {floor:.3g} ms/token (a 0.1% rise over the grid); profile larger "
            "token counts for a measured slope"
        )
        ffn_fit = AffineFit(
            floor, ffn_fit.beta, *quality(f[:, 1], floor * f[:, 0] + ffn_fit.beta), ffn_fit.n
        )
    fits = {"attention": attn_fit} | ({} if ffn_flat else {"ffn": ffn_fit})  # flat: said above
    warnings += poor_fit_warnings(fits)
    prefill = _fit_prefill(np.asarray(pre_pts, dtype=np.float64), attn_fit.alpha, attn_fit.beta)
    return attn_fit, ffn_fit, prefill, warnings


def fit_step(
    agg_pts: list[tuple],
    afd_pts: list[tuple],
    tok_pts: list[tuple],
    attn_fit: AffineFit,
    ffn_fit: AffineFit,
    comm: dict[str, Any],
    num_layers: int,
) -> dict[str, float]:
    """The profile's `step` object: the per-step cost outside the modelled layers (measured
    aggregated engine step - L * (attention + FFN), a line in N), the AFD engine's extra per
    step beyond 2 L fitted transfers (`afd_beta`), and the per-prefill-token work."""
    L = num_layers
    agg = np.asarray(agg_pts, dtype=np.float64)
    n, ctx = agg[:, 0], agg[:, 1]
    layers = L * (attn_fit.predict(n * ctx) + ffn_fit.predict(n))
    residual = np.maximum(agg[:, 2] - layers, 1e-6)
    step_fit = fit_affine(n, residual)
    afd = np.asarray(afd_pts, dtype=np.float64)
    comm_ms = comm["alpha"] * afd[:, 0] + comm["beta"]
    afd_extra = afd[:, 2] - agg[:, 2] - 2 * L * comm_ms
    tp = np.asarray(tok_pts, dtype=np.float64)
    tok_fit = fit_affine(tp[:, 0], tp[:, 1])
    return {
        **step_fit.to_dict(),
        "afd_beta": float(max(0.0, np.median(afd_extra))),
        "prefill_token_ms": tok_fit.alpha,
        "prefill_token_r2": tok_fit.r2,
    }


def poor_fit_warnings(fits: dict[str, AffineFit]) -> list[str]:
    """A warning per stage whose affine fit explains little of its timings. Seen on a GPU with
    the builtin models: every sub-block takes ~1 ms of kernel launches whatever the batch or
    context, so the slopes mean little and planning needs a larger model's profile."""
    return [
        f"{name} time barely follows its size (R^2 {fit.r2:.2f}): fixed costs dominate it here "
        "(kernel launches, on a GPU with a small model); its slope is not a basis for planning "
        "larger models"
        for name, fit in fits.items()
        if not fit.r2 >= POOR_FIT_R2
    ]


def _fit_prefill(pts: np.ndarray, alpha: float, beta: float) -> dict[str, float]:
    """With the decode fit's alpha_A (per context token read) and beta_A fixed, fit the rest of
    each chunk's time as token_ms * new tokens + pair_ms * (query, context) pairs, by
    non-negative least squares on absolute residuals: unlike decode, what matters is the big,
    budget-sized prefill steps, and small kernels are superlinear in size on CPU."""
    seqs, n, d, t = pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3]
    base = alpha * seqs * (d + n) + beta
    tokens = seqs * n
    pairs = seqs * (n * d + n * (n + 1) / 2.0)
    coef = fit_nonneg(np.stack([tokens, pairs], axis=1), t - base)
    pred = base + coef[0] * tokens + coef[1] * pairs
    r2, err = quality(t, pred)
    return {"token_ms": float(coef[0]), "pair_ms": float(coef[1]), "r2": r2, "max_rel_err": err}
