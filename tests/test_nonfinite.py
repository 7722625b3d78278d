"""NaN rows and infinite entries follow the documented policy and never touch other rows."""

from __future__ import annotations

import numpy as np
import pytest

import topk_core as tc
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
    # The array with a NaN takes the full-sort route, the clean one the lane solver: the same
    # numbers up to rounding.
    np.testing.assert_allclose(np.delete(g, 1, axis=0), np.delete(vjp_clean(u), 1, axis=0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["pav", "threshold", "dykstra"])
def test_nan_row_products_are_nan_in_both_directions_on_every_method(rng, operator, method):
    # The magnitude's residuals carry NaN in g' only (its set codes are integers): every entry of
    # both products must still be NaN on that row, and the other rows untouched.
    x = rng.normal(size=(3, 7))
    x[0, 4] = np.nan
    forward = getattr(tc, f"soft_topk_{operator}_forward")
    _, res = forward(x, 2, p=2.0, regularization_strength=0.5, method=method)
    _, res_clean = forward(x[1:], 2, p=2.0, regularization_strength=0.5, method=method)
    t = rng.normal(size=x.shape)
    for name in ("jvp", "vjp"):
        product = getattr(tc, f"{operator}_{name}_from_residuals")
        got = product(res, t)
        assert np.all(np.isnan(got[0])), name
        # (Routes and Dykstra's stopping test depend on the batch: equal up to their tolerance.)
        tol = 1e-6 if method == "dykstra" else 1e-12
        np.testing.assert_allclose(got[1:], product(res_clean, t[1:]), rtol=tol, atol=tol)


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


@pytest.mark.parametrize("method", ["pav", "threshold", "dykstra"])
def test_no_warnings_from_nonfinite_input(operator, method):
    # pytest turns warnings into errors: nothing (inf - inf, 0 * inf, big + big / 4) may leak out,
    # and every method follows PAV's policy, rows without a finite entry included (the threshold
    # method's mask overflowed there, with a warning).
    inf, nan = np.inf, np.nan
    rows = (np.array([[inf, -inf, nan, 1.0], [inf, -inf, 0.0, 1.0]]),
            np.array([[inf, -inf], [-inf, -inf], [inf, inf], [nan, inf]]), np.array([[inf]]), np.array([[-inf]]))
    for x in rows:
        for p in (2.0,) if method == "dykstra" else (3.0, 1.25, 2.0):
            for k in range(1, x.shape[1] + 1):
                got = SOFT[operator](x, k, p=p, method=method)
                np.testing.assert_allclose(got, SOFT[operator](x, k, p=p), rtol=0, atol=1e-12, err_msg=f"{x}, k={k}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 7), (3, 50), (70000, 1), (512, 300)])
def test_one_pass_finiteness_check_and_magnitude_keys(rng, dtype, shape):
    # The pass that decides the all-finite route (and writes |x| for the magnitude), on small
    # arrays and on arrays large enough for its threaded chunks; a non-finite entry anywhere
    # (first, last, a chunk's edge) is seen.
    from topk_core._pav.kernels import all_finite, row_keys

    x = rng.normal(size=shape).astype(dtype)
    x[0, 0] = np.finfo(dtype).max  # finite, however large
    x[-1, -1] = -np.finfo(dtype).tiny
    keys, finite = row_keys(x)
    assert finite and all_finite(x)
    np.testing.assert_array_equal(keys, np.abs(x))
    size = x.size
    for flat_index in (0, size - 1, size // 2, size // 3 + 1):
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y.reshape(-1)[flat_index] = bad
            assert not all_finite(y)
            keys, finite = row_keys(y)
            assert not finite
            np.testing.assert_array_equal(keys, np.abs(y))


def test_magnitude_of_rows_spanning_1e254_with_p_4_3():
    # The full-sort route rescales the row so that its k-th key is near 1: the strength becomes
    # ~1e168 there, whose cube overflows (the block equations are solved in units of l).
    x = np.full((2, 300), 8.0e-254)
    x[0, 0] = 1.0  # saturated: kept as it is
    x[1, 5] = np.nan  # sends the whole array to the full-sort route
    y = tk.soft_topk_mag(x, 16, p=4.0 / 3.0, regularization_strength=1.0)
    assert y[0, 0] == 1.0
    # The tiny entries share the remaining mass with a threshold far below them: outputs ~ x.
    np.testing.assert_allclose(y[0, 1:], x[0, 1:], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0])
@pytest.mark.parametrize("n", [16, 64])
def test_lane_solver_finds_the_non_finite_entries_it_loads(rng, operator, dtype, p, n):
    # Short rows with p = 2 or 4/3 and small k go to the lane solver with no finiteness pass before
    # it: the lanes find a NaN or infinite entry anywhere (any group, any lane, either end of a row,
    # threaded chunks), and the array takes the route that handles them.
    from topk_core._agnostic.regularizer import conjugate_exponent
    from topk_core._pav.select import lanes_check_finite

    k, lam = 2, 0.3
    assert lanes_check_finite(3000, n, k, conjugate_exponent(p), lam)
    x = rng.normal(size=(3000, n)).astype(dtype)
    clean = SOFT[operator](x, k, p=p, regularization_strength=lam)
    for row, col, bad in ((0, 0, np.nan), (1500, n - 1, np.inf), (2999, n // 2, -np.inf), (2999, 0, np.nan)):
        x_bad = x.copy()
        x_bad[row, col] = bad
        y = SOFT[operator](x_bad, k, p=p, regularization_strength=lam)
        y_res, vjp = VJP[operator](x_bad, k, p=p, regularization_strength=lam)
        np.testing.assert_array_equal(y_res, y)
        assert np.all(np.isfinite(np.delete(vjp(np.ones_like(x)), row, axis=0)))
        # The row alone, which no lane solves (it has a non-finite entry), and every other row as
        # the lanes solve them (the routes agree to rounding).
        alone = SOFT[operator](x_bad[row:row + 1], k, p=p, regularization_strength=lam)[0]
        np.testing.assert_array_equal(y[row], alone)
        assert np.all(np.isnan(y[row])) == np.isnan(bad)
        eps = np.finfo(dtype).eps
        np.testing.assert_allclose(np.delete(y, row, axis=0), np.delete(clean, row, axis=0),
                                   rtol=10 * eps, atol=10 * eps)


@pytest.mark.parametrize("p", [2.0, 4.0 / 3.0])
def test_lane_solver_takes_the_largest_finite_entries_as_finite(rng, operator, p, monkeypatch):
    # The lanes' check flags a key by ``key - key`` (NaN for NaN and both infinities): the largest
    # float32 numbers, whose sum or square overflows, are finite keys like any other, and the lanes
    # report every row finite (a NaN, the control, is reported).
    from topk_core._pav import select

    reports = []
    original = select.lane_rows
    monkeypatch.setattr(select, "lane_rows", lambda *a: reports.append(original(*a)) or reports[-1])
    k, lam, n = 2, 0.3, 16
    x = rng.normal(size=(3000, n)).astype(np.float32)
    big = np.finfo(np.float32).max
    x[1500, 3], x[2999, 0], x[7, 5], x[7, 6] = big, -big, big, -big
    y = SOFT[operator](x, k, p=p, regularization_strength=lam)
    assert reports and all(reports)
    reference = SOFT[operator](x, k, p=p, regularization_strength=lam, method="pav")
    assert np.all(np.isfinite(y))
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(y, reference, rtol=10 * eps, atol=10 * eps)
    reports.clear()
    x[40, 1] = np.nan
    SOFT[operator](x, k, p=p, regularization_strength=lam)
    assert reports[0] is False
