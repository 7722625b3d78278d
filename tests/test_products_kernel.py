"""The Numba Jacobian products (CPU fast path) against the Array-API products they mirror.

`topk_core._pav.products` evaluates the formulas of
`topk_core._agnostic.jacobians` for NumPy residuals in input order; the public
`*_from_residuals` functions take it for NumPy arrays.  Here both are run on
the same residuals (PAV and threshold methods, NaN rows, every entry
saturated, float32 and float64) and must agree to round-off.
"""

from __future__ import annotations

import array_api_compat.numpy as np_xp
import numpy as np
import pytest

import topk_core as tc
from topk_core._agnostic import jacobians
from topk_core._agnostic.residuals import MagResiduals, MaskResiduals
from topk_core._pav import products

FORWARD = {"mask": tc.soft_topk_mask_forward, "mag": tc.soft_topk_mag_forward}


def _array_api(operator: str, transpose: bool, res, t):
    if operator == "mask":
        return jacobians.mask_jvp_rows(res, t, np_xp)
    return (jacobians.mag_vjp_rows if transpose else jacobians.mag_jvp_rows)(res, t, np_xp)


def _numba(operator: str, transpose: bool, res, t):
    if operator == "mask":
        return products.mask_product_rows(res, t)
    return products.mag_product_rows(res, t, transpose)


# Row lengths: one the kernels' loops take as any length, and `products.SHORT_ROW`, whose rows the
# magnitude's kernel takes in a loop of that constant length.
ROW_LENGTHS = [33, products.SHORT_ROW]


def _cases(rng, dtype, n):
    x = rng.normal(size=(40, n)).astype(dtype)
    yield x, 5, 0.5  # many free entries per row
    yield x, n, 0.5  # k = n: every entry saturated
    yield np.round(x * 2).astype(dtype), 7, 0.1  # ties
    nan = x.copy()
    nan[3, 4] = np.nan
    yield nan, 5, 0.5  # a NaN row among finite ones
    inf = x.copy()
    inf[5, :3] = [np.inf, -np.inf, np.inf]
    yield inf, 6, 0.5  # the full-sort route of the fused kernel


@pytest.mark.parametrize("n", ROW_LENGTHS)
@pytest.mark.parametrize("method", ["pav", "threshold"])
@pytest.mark.parametrize("transpose", [False, True], ids=["jvp", "vjp"])
def test_numba_products_match_the_array_api_products(rng, operator, transpose, method, float_dtype, p, n):
    for x, k, lam in _cases(rng, float_dtype, n):
        if method == "threshold" and not np.all(np.isfinite(x) | np.isnan(x)):
            continue
        _, res = FORWARD[operator](x, k, regularization_strength=lam, p=p, method=method)
        assert res.perm is None
        t = rng.normal(size=x.shape).astype(float_dtype)
        got = _numba(operator, transpose, res, t)
        want = _array_api(operator, transpose, res, t)
        assert got.dtype == want.dtype == float_dtype
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        tol = 1e-5 if float_dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.nanmax(np.abs(want)))
        # Outside the support (g' = 0; for the magnitude, outside F and A) the product is +0.0 exactly.
        outside = (res.gprime if operator == "mask" else res.codes) == 0
        np.testing.assert_array_equal(got[outside], 0.0)
        assert not np.any(np.signbit(got[outside]))


def test_public_products_take_the_numba_path_for_numpy(monkeypatch, rng, operator):
    x = rng.normal(size=(4, 9))
    _, res = FORWARD[operator](x, 3)
    calls = []
    name = "mask_product_rows" if operator == "mask" else "mag_product_rows"
    original = getattr(products, name)
    monkeypatch.setattr(products, name, lambda *a: calls.append(1) or original(*a))
    product = tc.mask_vjp_from_residuals if operator == "mask" else tc.mag_vjp_from_residuals
    product(res, rng.normal(size=x.shape))
    assert calls == [1]


def test_numba_products_on_non_contiguous_tangents(rng, operator):
    x = rng.normal(size=(6, 10))
    _, res = FORWARD[operator](x, 3, p=2.0)
    t = rng.normal(size=(10, 6)).T  # a transposed view
    got = _numba(operator, True, res, t)
    np.testing.assert_allclose(got, _array_api(operator, True, res, np.ascontiguousarray(t)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("transpose", [False, True], ids=["jvp", "vjp"])
def test_numba_products_sum_in_float64_for_float32_residuals(operator, transpose):
    # One g' of 2^24 and 1023 of 1: summed in float32, every 1 added to 2^24 rounds away (the version
    # that did was 7.4e-6 relative off); in float64 the sums are exact.  The reference is the Array-API
    # product in float64 of the same residuals, rounded once, on the entries other than the first (whose
    # g' (t - ...) cancels in float32: the entries are computed in the residuals' dtype, as documented).
    n = 1024
    gprime = np.ones((2, n), dtype=np.float32)
    gprime[:, 0] = 2.0**24
    t = np.zeros((2, n), dtype=np.float32)
    t[:, 0] = 1.0
    t[1, 1] = -3.0
    if operator == "mask":
        res = MaskResiduals(None, None, None, None, gprime)
        wide = MaskResiduals(None, None, None, None, gprime.astype(np.float64))
    else:
        codes = np.ones((2, n), dtype=np.int8)
        codes[:, 1::2] = -1
        offset = np.full((2, 1), 2.0, dtype=np.float32)
        res = MagResiduals(None, None, None, None, gprime, codes, offset)
        wide = MagResiduals(None, None, None, None, gprime.astype(np.float64), codes, offset.astype(np.float64))
    got = _numba(operator, transpose, res, t)
    want = _array_api(operator, transpose, wide, t.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=2e-7, atol=0)
    # The first entry dominates (2^24 of 2^24 + 1023): taken apart in float64 (`_dominant_index`).
    np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=2e-7, atol=0)


def _exact_product(operator: str, transpose: bool, res, t: np.ndarray) -> np.ndarray:
    """The product of one row's residuals (as given, float64) in 50-digit arithmetic (spec section 6)."""
    import mpmath

    with mpmath.workdps(50):
        gp = [mpmath.mpf(float(v)) for v in res.gprime]
        tt = [mpmath.mpf(float(v)) for v in t]
        if operator == "mask":
            total = sum(gp)
            dgamma = sum(g * v for g, v in zip(gp, tt, strict=True)) / total
            return np.array([float(g * (v - dgamma)) for g, v in zip(gp, tt, strict=True)])
        codes = [int(c) for c in res.codes]
        sigma = [mpmath.mpf(c if abs(c) == 1 else 0) for c in codes]
        scale = [(1 + g) if c != 0 else mpmath.mpf(0) for g, c in zip(gp, codes, strict=True)]
        den = sum(gp) + mpmath.mpf(float(np.ravel(res.offset)[0]))
        if transpose:
            c = sum(s * a * v for s, a, v in zip(sigma, scale, tt, strict=True)) / den
            return np.array([float(a * v - s * g * c) for a, v, s, g in zip(scale, tt, sigma, gp, strict=True)])
        dgamma = sum(s * g * v for s, g, v in zip(sigma, gp, tt, strict=True)) / den
        return np.array([float(a * v - s * a * dgamma) for a, v, s in zip(scale, tt, sigma, strict=True)])


def _row(res, r):
    return type(res)(*(None if a is None else np.asarray(a)[r] for a in res))


def _dominated_residuals(operator, codes, n=6):
    """Residuals of two rows of `n` >= 6 built with one dominant g' each (1e12 at entry 0, 1e15 at entry 4;
    g' = 0 past entry 5); the magnitude's with the set `codes` of the first 6 entries given (0 past them)."""
    gp = np.zeros((2, n))
    gp[:, :6] = [[1e12, 1.0, 2.0, 0.5, 0.0, 0.0], [3.0, 1e-9, 0.0, 4.0, 1e15, 1.0]]
    if operator == "mask":
        return MaskResiduals(None, None, None, None, gp)
    padded = np.zeros((2, n), dtype=np.int8)
    padded[:, :6] = codes
    return MagResiduals(None, None, None, None, gp, padded, np.array([[1.0], [0.0]]))


@pytest.mark.parametrize("n", [6, products.SHORT_ROW])
@pytest.mark.parametrize("transpose", [False, True], ids=["jvp", "vjp"])
@pytest.mark.parametrize("path", ["numba", "array_api"])
def test_products_at_a_dominant_entry_are_accurate(operator, transpose, path, n):
    # Where one g' exceeds the rest of the row's total by far, its product, g'_m (t_m - dgamma) as
    # written, is a difference of two terms of about g'_m |t| whose value is about (total - g'_m) |t|:
    # at p = 8 on normal rows of 64 the mask's VJP was 2.2e-9 and the magnitude's up to 9.3e-6 off
    # (relative to the row's largest product), with g' accurate to 1e-14.  Taken apart at that entry, the
    # products are within 1e-12 of 50-digit ones of the same residuals; also on rows built with one g' of
    # 1e12 (no PAV or threshold row needed).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 64))
    _, res = FORWARD[operator](x, 8, regularization_strength=1.0, p=8.0, method="pav")
    built = _dominated_residuals(operator, [[1, -1, 1, 1, 2, 0], [-1, 1, 0, -1, 1, 2]], n)
    product = _numba if path == "numba" else _array_api
    for residuals in (res, built):
        t = rng.normal(size=np.shape(residuals.gprime))
        got = product(operator, transpose, residuals, t)
        for r in range(t.shape[0]):
            want = _exact_product(operator, transpose, _row(residuals, r), t[r])
            np.testing.assert_allclose(got[r], want, rtol=0, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("n", [6, products.SHORT_ROW])
@pytest.mark.parametrize("transpose", [False, True], ids=["jvp", "vjp"])
@pytest.mark.parametrize("path", ["numba", "array_api"])
def test_a_zero_product_at_a_dominant_entry_is_positive_zero(operator, transpose, path, n):
    # Both paths turn the -0.0 of `0 * negative` into +0.0 (`jacobians`: `out + 0.0`), at the dominant entry
    # too, whose product is formed apart: there a magnitude entry of negative x (code -1) gave -0.0 on the
    # Numba path for a zero tangent.
    res = _dominated_residuals(operator, [[-1, -1, 1, 1, 2, 0], [-1, 1, 0, -1, -1, 2]], n)
    product = _numba if path == "numba" else _array_api
    got = product(operator, transpose, res, np.zeros_like(res.gprime))
    np.testing.assert_array_equal(got, 0.0)
    assert not np.any(np.signbit(got))
