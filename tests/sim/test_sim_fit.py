"""Least-squares fits used by the profile."""

from __future__ import annotations

import numpy as np
import pytest

from afdserve.errors import UserInputError
from afdserve.sim.fit import fit_affine, fit_nonneg


def test_affine_fit_recovers_exact_lines_and_reports_quality() -> None:
    x = np.array([1.0, 10.0, 100.0, 1000.0])
    f = fit_affine(x, 0.002 * x + 0.5)
    assert f.alpha == pytest.approx(0.002) and f.beta == pytest.approx(0.5)
    assert f.r2 == pytest.approx(1.0) and f.max_rel_err < 1e-12


def test_relative_residuals_keep_small_points_accurate() -> None:
    """A superlinear large point must not wreck the fit of the small ones."""
    x = np.array([1.0, 2.0, 4.0, 8.0, 1000.0])
    t = np.array([1.0, 1.01, 1.02, 1.04, 40.0])
    f = fit_affine(x, t)
    ols = np.polyfit(x, t, 1)
    rel = f.predict(x) / t - 1
    rel_ols = np.polyval(ols, x) / t - 1
    assert np.sum(rel**2) <= np.sum(rel_ols**2)  # what the fit minimises
    assert np.mean(np.abs(rel[:4])) < np.mean(np.abs(rel_ols[:4]))  # the small points gain
    assert f.max_rel_err == pytest.approx(np.max(np.abs(rel)))


def test_negative_coefficients_are_clipped() -> None:
    x = np.array([1.0, 2.0, 3.0])
    f = fit_affine(x, np.array([3.0, 2.0, 1.0]))  # decreasing: noise, not a cost
    assert f.alpha == 0.0 and f.beta > 0
    g = fit_affine(x, np.array([0.5, 2.0, 3.5]))  # would need a negative intercept
    assert g.beta == 0.0 and g.alpha > 0
    with pytest.raises(UserInputError):
        fit_affine(np.array([1.0]), np.array([1.0]))
    with pytest.raises(UserInputError):
        fit_affine(np.array([1.0, 2.0]), np.array([1.0, 0.0]))


def test_nonnegative_least_squares() -> None:
    X = np.array([[1.0, 1.0], [2.0, 4.0], [3.0, 9.0], [4.0, 16.0]])
    c = fit_nonneg(X, X @ np.array([0.5, 0.25]))
    np.testing.assert_allclose(c, [0.5, 0.25], rtol=1e-9)
    assert np.all(fit_nonneg(X, -X @ np.array([1.0, 1.0])) == 0)


def test_poor_fits_are_reported_and_good_ones_are_not() -> None:
    from afdserve.calibration.fit_in_process import poor_fit_warnings

    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    good = fit_affine(x, 0.5 + 0.1 * x)
    flat = fit_affine(x, np.array([1.0, 1.2, 0.9, 1.1, 1.0]))  # launch-bound: no trend
    assert good.r2 > 0.99 and flat.r2 < 0.5
    warnings = poor_fit_warnings({"attention": flat, "ffn": good})
    assert len(warnings) == 1 and warnings[0].startswith("attention time barely follows")
    assert poor_fit_warnings({"ffn": good}) == []
