"""Least-squares fits of measured stage times, with the fit quality the profile JSON reports.

`fit_affine(x, t)`: t ~ alpha * x + beta by least squares on relative residuals
((fit - t) / t, i.e. weights 1/t): measured grids span orders of magnitude, and an ordinary fit
would let the largest points decide and miss the small ones by far more than they weigh in
serving. Both coefficients are clipped at 0 (a negative slope or intercept is measurement noise,
not a cost) and the other refitted. Quality: R^2 (unweighted) and the worst relative error
|fit - measured| / measured over the points. `fit_nonneg(X, y)`: y ~ X @ c with c >= 0 (scipy's NNLS) for the prefill terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from afdserve.errors import UserInputError


@dataclass(frozen=True)
class AffineFit:
    alpha: float
    beta: float
    r2: float
    max_rel_err: float
    n: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.alpha * np.asarray(x, dtype=np.float64) + self.beta

    def to_dict(self) -> dict[str, float]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "r2": self.r2,
            "max_rel_err": self.max_rel_err,
        }


def quality(measured: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """(R^2, worst relative error)."""
    y = np.asarray(measured, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    ss_res = float(np.sum((y - p) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    rel = np.abs(p - y) / np.maximum(np.abs(y), 1e-12)
    return r2, float(rel.max())


def fit_affine(x: np.ndarray, t: np.ndarray) -> AffineFit:
    xs = np.asarray(x, dtype=np.float64)
    ts = np.asarray(t, dtype=np.float64)
    if xs.shape != ts.shape or xs.ndim != 1 or xs.size < 2:
        raise UserInputError("an affine fit needs at least two (x, t) points")
    if np.any(ts <= 0) or not np.all(np.isfinite(ts)):
        raise UserInputError("measured times must be finite and > 0")
    w = 1.0 / ts  # relative residuals
    if np.ptp(xs) == 0:
        alpha, beta = 0.0, float(np.sum(w * w * ts) / np.sum(w * w))
    else:
        A = np.stack([xs * w, w], axis=1)
        (alpha, beta), *_ = np.linalg.lstsq(A, ts * w, rcond=None)
        alpha, beta = float(alpha), float(beta)
    if alpha < 0:
        alpha, beta = 0.0, float(np.sum(w * w * ts) / np.sum(w * w))
    if beta < 0:
        xw = xs * w
        beta = 0.0
        alpha = max(0.0, float(xw @ (ts * w) / (xw @ xw)))
    r2, err = quality(ts, alpha * xs + beta)
    return AffineFit(alpha, beta, r2, err, int(xs.size))


def fit_nonneg(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares coefficients of y ~ X @ c."""
    from scipy.optimize import nnls

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    # scale columns so that NNLS is well conditioned
    scale = np.maximum(np.abs(X).max(axis=0), 1e-300)
    c, _ = nnls(X / scale, y)
    return c / scale
