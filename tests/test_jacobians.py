"""Jacobian products: finite differences, adjointness, linearity and the pitfalls of spec section 6."""

from __future__ import annotations

import numpy as np
import pytest

import topk_numpy as tk

from ._oracles import finite_difference_jacobian

FORWARD = {"mask": tk.soft_topk_mask, "mag": tk.soft_topk_mag}
VJP = {"mask": tk.soft_topk_mask_vjp, "mag": tk.soft_topk_mag_vjp}
JVP = {"mask": tk.soft_topk_mask_jvp, "mag": tk.soft_topk_mag_jvp}


def _jacobian_by_jvp(operator, x, k, **kw):
    return np.stack([JVP[operator](x, e, k, **kw)[1] for e in np.eye(x.size)], axis=1)


def _jacobian_by_vjp(operator, x, k, **kw):
    _, vjp_fn = VJP[operator](x, k, **kw)
    return np.stack([vjp_fn(e) for e in np.eye(x.size)], axis=0)


def _non_trivial_row(rng, n):
    # Well-separated values with a wide free set: away from kinks, as finite differences need.
    return rng.permutation(np.linspace(-2.0, 2.0, n)) + rng.uniform(-0.02, 0.02, n)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_jacobian_matches_finite_differences(rng, p, operator, k):
    x = _non_trivial_row(rng, 9)
    kw = dict(regularization_strength=1.5, p=p)
    fd = finite_difference_jacobian(lambda z: FORWARD[operator](z, k, **kw), x)
    np.testing.assert_allclose(_jacobian_by_jvp(operator, x, k, **kw), fd, atol=1e-6)
    np.testing.assert_allclose(_jacobian_by_vjp(operator, x, k, **kw), fd, atol=1e-6)


@pytest.mark.parametrize("p_value", [5.0, 8.0])
def test_pav_jacobian_matches_finite_differences_up_to_p_8(rng, operator, p_value):
    # method="pav" serves p <= 8 (up to commit 62fd162, p <= 4); the threshold method's products agree.
    x = _non_trivial_row(rng, 9)
    kw = dict(regularization_strength=1.5, p=p_value)
    fd = finite_difference_jacobian(lambda z: FORWARD[operator](z, 3, method="threshold", **kw), x)
    pav = _jacobian_by_vjp(operator, x, 3, method="pav", **kw)
    np.testing.assert_allclose(pav, fd, atol=1e-6)
    np.testing.assert_allclose(_jacobian_by_jvp(operator, x, 3, method="pav", **kw), pav, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_jacobian_by_vjp(operator, x, 3, method="threshold", **kw), pav, rtol=1e-9, atol=1e-12)


def test_free_set_is_non_trivial_in_the_finite_difference_test(rng, operator):
    x = _non_trivial_row(rng, 9)
    y = FORWARD[operator](x, 3, regularization_strength=1.5)
    ref = np.abs(x) if operator == "mag" else np.ones_like(x)
    frac = np.abs(y) / ref
    assert np.sum((frac > 0) & (frac < 1 - 1e-9)) >= 2


def test_adjointness_batched_on_every_axis(rng, p, operator):
    x = rng.normal(size=(3, 5, 7))
    for axis in range(3):
        kw = dict(regularization_strength=0.8, p=p, axis=axis)
        v = rng.normal(size=x.shape)
        u = rng.normal(size=x.shape)
        _, jv = JVP[operator](x, v, 2, **kw)
        _, vjp_fn = VJP[operator](x, 2, **kw)
        np.testing.assert_allclose(np.sum(jv * u), np.sum(v * vjp_fn(u)), rtol=1e-10, atol=1e-12)


def test_products_are_linear(rng, operator):
    x = rng.normal(size=(4, 10))
    _, vjp_fn = VJP[operator](x, 3, regularization_strength=0.9)
    a, b = rng.normal(size=x.shape), rng.normal(size=x.shape)
    np.testing.assert_allclose(vjp_fn(2.0 * a - 3.0 * b), 2.0 * vjp_fn(a) - 3.0 * vjp_fn(b), atol=1e-12)


def test_mask_jacobian_is_symmetric(rng, p):
    x = _non_trivial_row(rng, 8)
    jac = _jacobian_by_jvp("mask", x, 3, regularization_strength=2.0, p=p)
    np.testing.assert_allclose(jac, jac.T, atol=1e-12)


def test_pitfall_tied_saturated_entries_have_zero_vjp():
    # spec section 6: x = (3, 1, 1, -2), k = 1, l = 0.1, p = 2, cotangent (0.3, -1, 0.7, 0.2): VJP is 0.
    _, vjp_fn = tk.soft_topk_mask_vjp(np.array([3.0, 1.0, 1.0, -2.0]), 1, regularization_strength=0.1, p=2.0)
    np.testing.assert_array_equal(vjp_fn(np.array([0.3, -1.0, 0.7, 0.2])), 0.0)


def test_pitfall_ties_only_after_float32_rounding():
    x = np.array([3.0, 1.0, 1.0 + 1e-9, -2.0], dtype=np.float32)  # 1 + 1e-9 rounds to 1 in float32
    _, vjp_fn = tk.soft_topk_mask_vjp(x, 1, regularization_strength=0.1, p=2.0)
    np.testing.assert_array_equal(vjp_fn(np.array([0.3, -1.0, 0.7, 0.2], dtype=np.float32)), 0.0)


@pytest.mark.parametrize("p_value", [4.0 / 3.0, 3.0, 1.25])
def test_pitfall_no_nan_at_exact_zeros(rng, operator, p_value):
    x = np.concatenate([rng.normal(size=6), np.zeros(4)])
    x[:3] += 5.0
    _, vjp_fn = VJP[operator](x, 2, regularization_strength=0.3, p=p_value)
    _, jv = JVP[operator](x, np.ones_like(x), 2, regularization_strength=0.3, p=p_value)
    for g in (vjp_fn(np.ones_like(x)), jv):
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[6:], 0.0)


def test_non_unique_threshold_gives_zero_mask_jacobian():
    # No fractional entry: any tau in [x_(k+1), x_(k) - l] works and J must be 0.
    x = np.array([5.0, 4.0, 0.0, -1.0])
    jac = _jacobian_by_jvp("mask", x, 2, regularization_strength=0.5)
    np.testing.assert_array_equal(jac, 0.0)


def test_mag_jacobian_is_identity_when_at_most_k_nonzeros():
    # The output is x itself; along directions that keep the zeros at zero the
    # derivative is the identity (other directions cross the kink at exact zeros).
    x = np.array([0.0, 2.0, 0.0, -3.0, 0.0])
    tangent = np.array([0.0, 1.5, 0.0, -0.5, 0.0])
    y, jv = tk.soft_topk_mag_jvp(x, tangent, 3)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(jv, tangent)


@pytest.mark.parametrize("method", ["pav", "threshold", "dykstra"])
def test_mag_zeros_of_a_row_with_fewer_than_k_nonzeros_have_derivative_one(method):
    # Moving one zero off 0 still leaves at most k non-zero entries, where the output is x: every
    # partial derivative is 1, for every zero alike. (PAV used to give 1 to the zeros that its sort
    # put among the first k and 0 to the others, and disagreed with the threshold method.)
    # With exactly k non-zero entries a zero moved off 0 loses to them: derivative 0.
    cases = [
        (np.array([0.0, 0.0]), 1, [1.0, 1.0]),
        (np.array([0.0, 3.0, 0.0, 0.0, 0.0]), 3, [1.0] * 5),
        (np.array([[0.0, -2.0, 0.0, np.inf]]), 2, [[0.0, 1.0, 0.0, 1.0]]),  # inf takes one unit: k - 1 = 1
        (np.array([0.0, 3.0, -1.0, 0.0]), 2, [0.0, 1.0, 1.0, 0.0]),
    ]
    for x, k, want in cases:
        y, vjp_fn = tk.soft_topk_mag_vjp(x, k, p=2.0, method=method)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(vjp_fn(np.ones_like(x)), want)
        _, jv = tk.soft_topk_mag_jvp(x, np.ones_like(x), k, p=2.0, method=method)
        np.testing.assert_array_equal(jv, want)


def test_mag_saturated_entries_pass_gradient_through(rng):
    x = np.array([10.0, -9.0, 0.3, 0.2, -0.25, 0.1])
    y, vjp_fn = tk.soft_topk_mag_vjp(x, 3, regularization_strength=0.2)
    g = vjp_fn(np.ones_like(x))
    assert y[0] == 10.0 and y[1] == -9.0
    np.testing.assert_array_equal(g[:2], 1.0)


def test_shape_mismatch_raises():
    x = np.ones((2, 3))
    _, vjp_fn = tk.soft_topk_mask_vjp(x, 1)
    with pytest.raises(ValueError, match="cotangent"):
        vjp_fn(np.ones((3, 2)))
    with pytest.raises(ValueError, match="tangent"):
        tk.soft_topk_mag_jvp(x, np.ones(3), 1)


@pytest.mark.parametrize("p_value", [4.0 / 3.0, 2.0, 1.5])
def test_row_form_and_block_form_residuals_agree(rng, operator, p_value):
    # The fused kernel stores residuals in input order (one segment per row); the unfused
    # route stores them in sorted order with integer block ids and segment sums.
    import array_api_compat.numpy as xp

    from topk_core._agnostic import jacobians
    from topk_core._pav_path import pav_mag, pav_mask

    solver = pav_mag if operator == "mag" else pav_mask
    x = rng.normal(size=(25, 13))
    x[::3] = np.round(x[::3])
    x[4, 2] = np.nan
    x[5, 1] = np.inf
    q = 4.0 if p_value == 4.0 / 3.0 else p_value / (p_value - 1)
    y_row, res_row = solver(x, 4, 0.8, q, True, True)
    y_blk, res_blk = solver(x, 4, 0.8, q, True, False)
    assert res_row.perm is None and res_blk.perm is not None
    np.testing.assert_allclose(y_row, y_blk, rtol=1e-13, atol=1e-13)
    products = [jacobians.mask_jvp_rows] if operator == "mask" else [jacobians.mag_jvp_rows, jacobians.mag_vjp_rows]
    for product in products:
        u = rng.normal(size=x.shape)
        np.testing.assert_allclose(product(res_row, u, xp), product(res_blk, u, xp), rtol=1e-12, atol=1e-12)


class _LossyMatmul:
    """NumPy's Array-API namespace under another name, whose float32 matmul rounds its inputs to 10
    bits of mantissa first (float16), as TF32 does on NVIDIA GPUs (JAX's default there)."""

    __name__ = "lossy_matmul"

    def __init__(self):
        import array_api_compat.numpy as xp

        self._xp = xp

    def __getattr__(self, name):
        return getattr(self._xp, name)

    def matmul(self, a, b):
        return self._xp.matmul(a.astype(np.float16).astype(a.dtype), b.astype(np.float16).astype(b.dtype))


def test_products_do_not_trust_an_accelerators_matmul(rng, operator):
    # Row sums of the products once went through matmul with ones: on a GPU under JAX (TF32 by
    # default) every term of the Jacobian's sums lost 13 bits.
    import array_api_compat.numpy as xp

    from topk_core._agnostic import jacobians
    from topk_core._pav_path import pav_mag, pav_mask

    solver = pav_mag if operator == "mag" else pav_mask
    x = rng.normal(size=(64, 33)).astype(np.float32)
    _, res = solver(x, 5, 0.1, 4.0, True, True)
    u = rng.normal(size=x.shape).astype(np.float32)
    product = jacobians.mask_jvp_rows if operator == "mask" else jacobians.mag_vjp_rows
    np.testing.assert_allclose(product(res, u, _LossyMatmul()), product(res, u, xp), rtol=2e-5, atol=2e-5)


@pytest.mark.xfail(strict=True, reason="known limit (docs/methods.md): float32, p > 2, keys near the bottom of "
                   "float32's range: g' of the free entries (3.5e38) exceeds float32, the residual is inf")
def test_float32_jacobian_of_tiny_keys_at_large_p_is_finite():
    # Seven ties of 1e-38 below one key of 1e-6, k = 2, p = 3, l = 1: the ties share one unit
    # weight, and their g' = (q - 1) l^(1 - q) r^(q - 2) is 3.5e38 (finite in float64, whose VJP of
    # ones is [1, 0, ...]).  The outputs are right; the float32 products are NaN.
    x = np.array([1e-6] + [1e-38] * 7, dtype=np.float32)
    _, vjp = tk.soft_topk_mag_vjp(x, 2, p=3.0, regularization_strength=1.0)
    assert np.all(np.isfinite(vjp(np.ones_like(x))))


@pytest.mark.parametrize("residual_type", ["MaskResiduals", "MagResiduals"])
def test_with_gprime_replaces_gprime_alone(residual_type):
    # `with_gprime` is `_replace(gprime=...)` by position (which Dynamo traces on torch 2.8).
    from topk_core._agnostic import residuals

    cls = getattr(residuals, residual_type)
    assert cls._fields.index("gprime") == residuals.GPRIME_AT
    res = cls(*(f"field {i}" for i in range(len(cls._fields))))
    new = residuals.with_gprime(res, "new g'")
    assert type(new) is cls and new == res._replace(gprime="new g'")
