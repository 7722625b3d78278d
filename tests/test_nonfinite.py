"""NaN rows and infinite entries follow the documented policy and never touch other rows."""

from __future__ import annotations

import numpy as np
import pytest

import topk_numpy as tk

SOFT = {"mask": tk.soft_topk_mask, "mag": tk.soft_topk_mag}
HARD = {"mask": tk.hard_topk_mask, "mag": tk.hard_topk_mag}
VJP = {"mask": tk.soft_topk_mask_vjp, "mag": tk.soft_topk_mag_vjp}


@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0, 1.5])
def test_nan_row_is_nan_and_other_rows_are_untouched(rng, operator, p):
    x = rng.normal(size=(5, 8))
    clean = SOFT[operator](x, 3, p=p, regularization_strength=0.7)
    x_nan = x.copy()
    x_nan[2, 4] = np.nan
    got = SOFT[operator](x_nan, 3, p=p, regularization_strength=0.7)
    assert np.all(np.isnan(got[2]))
    # An array with a NaN takes the full-sort route; a clean one, for p = 2, the lane solver:
    # the same values up to float64 rounding.
    np.testing.assert_allclose(np.delete(got, 2, axis=0), np.delete(clean, 2, axis=0), rtol=1e-14, atol=1e-15)
    hard = HARD[operator](x_nan, 3)
    assert np.all(np.isnan(hard[2]))
    np.testing.assert_array_equal(np.delete(hard, 2, axis=0), np.delete(HARD[operator](x, 3), 2, axis=0))


def test_nan_row_gradients_stay_in_their_row(rng, operator):
    x = rng.normal(size=(4, 6))
    _, vjp_clean = VJP[operator](x, 2, regularization_strength=0.9)
    x[1, 0] = np.nan
    _, vjp_fn = VJP[operator](x, 2, regularization_strength=0.9)
    u = rng.normal(size=x.shape)
    g = vjp_fn(u)
    assert np.all(np.isnan(g[1]))
    np.testing.assert_array_equal(np.delete(g, 1, axis=0), np.delete(vjp_clean(u), 1, axis=0))


def test_mask_plus_inf_selected_first_and_minus_inf_last():
    x = np.array([[1.0, np.inf, 2.0, -np.inf, 0.5]])
    np.testing.assert_array_equal(tk.soft_topk_mask(x, 1), [[0, 1, 0, 0, 0]])
    y = tk.soft_topk_mask(x, 2, regularization_strength=0.1)
    assert y[0, 1] == 1.0 and y[0, 3] == 0.0
    np.testing.assert_allclose(y[0, [0, 2, 4]], tk.soft_topk_mask(np.array([1.0, 2.0, 0.5]), 1), atol=1e-15)
    np.testing.assert_array_equal(tk.soft_topk_mask(x, 5), [[1, 1, 1, 1, 1]])


def test_mask_ties_among_infinities_share_evenly():
    x = np.array([np.inf, 3.0, np.inf, np.inf])
    np.testing.assert_allclose(tk.soft_topk_mask(x, 2), [2 / 3, 0, 2 / 3, 2 / 3])
    y = np.array([-np.inf, 3.0, -np.inf, 1.0])
    np.testing.assert_allclose(tk.soft_topk_mask(y, 3), [0.5, 1, 0.5, 1])


def test_mag_infinite_entries_are_kept():
    x = np.array([1.0, -np.inf, 2.0, 0.1])
    y = tk.soft_topk_mag(x, 2, regularization_strength=0.01)
    np.testing.assert_array_equal(y, [0.0, -np.inf, 2.0, 0.0])
    np.testing.assert_array_equal(tk.soft_topk_mag(np.array([np.inf, -np.inf, 1.0]), 1), [np.inf, -np.inf, 0.0])


def test_infinite_entries_have_finite_gradients_elsewhere(operator):
    x = np.array([[np.inf, 1.0, 0.8, -np.inf, 0.2]])
    _, vjp_fn = VJP[operator](x, 2, regularization_strength=1.0)
    g = vjp_fn(np.ones_like(x))
    assert np.all(np.isfinite(g))


def test_hard_operators_with_infinities():
    x = np.array([1.0, np.inf, -np.inf, 2.0])
    np.testing.assert_array_equal(tk.hard_topk_mask(x, 2), [0, 1, 0, 1])
    np.testing.assert_array_equal(tk.hard_topk_mag(x, 2), [0, np.inf, -np.inf, 0])


def test_no_warnings_from_nonfinite_input(operator):
    # pytest turns warnings into errors: nothing (inf - inf, 0 * inf) may leak out.
    x = np.array([[np.inf, -np.inf, np.nan, 1.0], [np.inf, -np.inf, 0.0, 1.0]])
    SOFT[operator](x, 2, p=3.0)
    SOFT[operator](x, 2, p=1.25)
