"""method="dykstra": p = 2, alternating pair projections, pure Array API, on every backend.

Oracles: the Numba PAV (method="pav"), and SciPy's isotonic regression for
the isotonic kernel itself; neither shares code with Dykstra's iterations.
"""

from __future__ import annotations

import numpy as np
import pytest

import topk_core as tc
from topk_core._agnostic import dykstra

from ._method_backends import FORWARD, JVP, VJP, cuda_torch


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_converges_to_pav(backend, rng, operator, lam):
    x = rng.normal(size=(20, 12))
    for k in (1, 3, 11):
        xb = backend.to(x)
        y, res = FORWARD[operator](xb, k, p=2.0, regularization_strength=lam, method="dykstra")
        backend.assert_like(y, xb)
        want, want_res = FORWARD[operator](x, k, p=2.0, regularization_strength=lam, method="pav")
        np.testing.assert_allclose(backend.back(y), want, rtol=0, atol=1e-9)
        # Jacobians from the blocks Dykstra converged to agree with PAV's.
        t = rng.normal(size=x.shape)
        for products in (JVP, VJP):
            got = backend.back(products[operator](res, backend.to(t)))
            np.testing.assert_allclose(got, products[operator](want_res, t), rtol=1e-8, atol=1e-9)


def test_ties_and_nonfinite_rows(backend, operator):
    inf, nan = np.inf, np.nan
    x = np.array([
        [3.0, 3.0, 3.0, 0.0, -1.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [inf, 1.0, 2.0, -inf, 0.5],
        [-inf, -inf, 1.0, 2.0, 3.0],
        [nan, 1.0, 2.0, 3.0, 4.0],
        [2.0, -2.0, 2.0, -2.0, 0.5],
    ])
    for k in (1, 2, 4):
        y, _ = FORWARD[operator](backend.to(x), k, p=2.0, method="dykstra")
        want, _ = FORWARD[operator](x, k, p=2.0, method="pav")
        got = backend.back(y)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        same = (got == want) | np.isnan(want)
        np.testing.assert_allclose(np.where(same, 0.0, got), np.where(same, 0.0, want), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_at_small_strengths_are_split(backend, operator, dtype):
    # A tie at the threshold is split evenly at any strength.  With targets s - l w (mask) or
    # s / (1 + l w) (magnitude) formed from the keys as they are, a strength below the keys' ulp
    # was lost (float32 at l = 1e-10: the tie came back 1 and 0, the magnitude's 1.5 and 0);
    # relative to the k-th key it is kept.
    tiny = float(np.finfo(dtype).tiny)
    x = np.array([[3.0, 1.5, 1.5, 0.5], [1e3 + 2.0, 1e3, 1e3, -4.0]], dtype=dtype)
    for lam in (1e-3, 1e-6, 1e-10, 1e-20, 1e4 * tiny):
        y, _ = FORWARD[operator](backend.to(x), 2, p=2.0, regularization_strength=lam, method="dykstra")
        want, _ = FORWARD[operator](x.astype(np.float64), 2, p=2.0, regularization_strength=lam, method="pav")
        got = backend.back(y)
        np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps, atol=0, err_msg=f"l = {lam}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mag_of_keys_near_the_float_range(backend, dtype):
    # Relative to the k-th key, the targets' term l s_(k) w' / (1 + l) is formed without the
    # product l s_(k), which overflows at keys near the float range (the outputs were x, 0, 0).
    big = float(np.finfo(dtype).max)
    x = np.array([[big / 1.7, big / 3.4, 1.0]], dtype=dtype)
    y, _ = FORWARD["mag"](backend.to(x), 1, p=2.0, regularization_strength=10.0, method="dykstra")
    want, _ = FORWARD["mag"](x.astype(np.float64), 1, p=2.0, regularization_strength=10.0, method="pav")
    np.testing.assert_allclose(backend.back(y), want, rtol=8 * np.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("lam", [0.1, 1.0])
@pytest.mark.parametrize(
    ("dtype", "scale"), [(np.float32, 1e6), (np.float64, 1e14), (np.float64, 1e100)],
    ids=["float32-1e6", "float64-1e14", "float64-1e100"],
)
def test_large_keys_match_pav(backend, operator, lam, dtype, scale):
    # The block is read from the iterate, whose round-off grows with it (the magnitude's with |x|):
    # with a block tolerance in units of l only, converged blocks were split, up to 30% off PAV and
    # tied |x| with different outputs, from |x| ~ 1e6 (float32) and 1e14 (float64) on.  (The JAX
    # adapter's structured loop, which stops at the first iteration within the tolerance, met it on
    # more rows than the Python loop, which tests every 8th: tests/test_jax_methods.py.)
    x = _large_rows(dtype, scale)
    y, _ = FORWARD[operator](backend.to(x), 3, p=2.0, regularization_strength=lam, method="dykstra")
    _assert_matches_pav_at_scale(backend.back(y), x, operator, lam)


@pytest.mark.parametrize("lam", [0.1, 1.0])
@pytest.mark.parametrize(
    ("dtype", "scale"), [(np.float32, 1e6), (np.float64, 1e14), (np.float64, 1e100)],
    ids=["float32-1e6", "float64-1e14", "float64-1e100"],
)
def test_large_keys_with_a_structured_loop_match_pav(operator, lam, dtype, scale):
    # The `loop=` hook (jax.lax.while_loop in topk_jax) tests the tolerance at every iteration; here
    # a Python loop of the same semantics, on NumPy rows.
    xp = pytest.importorskip("array_api_compat.numpy")

    def while_loop(cond, body, state):
        while bool(cond(state)):
            state = body(state)
        return state

    solver = {"mask": dykstra.dykstra_mask, "mag": dykstra.dykstra_mag}[operator]
    x = _large_rows(dtype, scale)
    y, _ = solver(x, 3, lam, 2.0, xp, loop=while_loop)
    _assert_matches_pav_at_scale(np.asarray(y), x, operator, lam)


def _large_rows(dtype, scale):
    x = np.random.default_rng(21).normal(size=(24, 9))
    x[:12] = np.round(x[:12] * 4.0) / 4.0  # ties and pooled blocks
    x[:, 1] = -x[:, 0]  # tied |x|
    x = np.concatenate([[[1.7, -1.7, 1.6, 1.0, 0.3, 0.2, -0.1, 0.05, 0.0]], x]) * scale
    return x.astype(dtype)


def _assert_matches_pav_at_scale(got, x, operator, lam):
    want, _ = FORWARD[operator](x.astype(np.float64), 3, p=2.0, regularization_strength=lam, method="pav")
    np.testing.assert_allclose(got, want, rtol=0, atol=8 * np.finfo(x.dtype).eps * np.abs(want).max())
    if operator == "mag":  # tied |x| get tied outputs
        np.testing.assert_array_equal(np.abs(got[:, 0]), np.abs(got[:, 1]))


def test_tied_saturated_entries_get_an_exact_zero_vjp(backend):
    # Spec section 6 pitfall: entries tied at y = 0 must not be pooled by the block tolerance.
    x = backend.to(np.array([[3.0, 1.0, 1.0, -2.0]]))
    y, res = tc.soft_topk_mask_forward(x, 1, p=2.0, regularization_strength=0.1, method="dykstra")
    np.testing.assert_array_equal(backend.back(y), [[1.0, 0.0, 0.0, 0.0]])
    u = backend.to(np.array([[0.3, -1.0, 0.7, 0.2]]))
    np.testing.assert_array_equal(backend.back(tc.mask_vjp_from_residuals(res, u)), 0.0)
    # Tied entries saturated at y = 1 (k = 2) likewise.
    y, res = tc.soft_topk_mask_forward(backend.to(np.array([[3.0, 3.0, 1.0, -2.0]])), 2, p=2.0, method="dykstra")
    np.testing.assert_array_equal(backend.back(y), [[1.0, 1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(backend.back(tc.mask_vjp_from_residuals(res, u)), 0.0)


@pytest.mark.parametrize("p", [1.25, 4.0 / 3.0, 3.0])
def test_other_exponents_are_refused(operator, p):
    with pytest.raises(ValueError, match=r"method='dykstra' solves the p = 2 operators only.*got p = "):
        getattr(tc, f"soft_topk_{operator}")(np.ones((2, 4)), 2, p=p, method="dykstra")


def test_isotonic_kernel_matches_scipy(rng):
    scipy_optimize = pytest.importorskip("scipy.optimize")
    xp = pytest.importorskip("array_api_compat.numpy")
    y = rng.normal(size=(6, 9)).cumsum(axis=-1)[:, ::-1] + rng.normal(size=(6, 9))  # mostly decreasing
    w = rng.uniform(0.5, 2.0, size=y.shape)
    v, _ = dykstra.isotonic_dykstra(y, w, np.ones(y.shape, dtype=bool), 20000, np.full((6, 1), 1e-13), xp)
    for row, weights, got in zip(y, w, v, strict=True):
        want = scipy_optimize.isotonic_regression(row, weights=weights, increasing=False).x
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)


def test_iteration_budget_controls_the_approximation(rng, operator):
    # A long pooled block needs many iterations; the exact block mean is taken once it is found.
    x = rng.normal(size=(4, 60))
    want, _ = FORWARD[operator](x, 20, p=2.0, regularization_strength=3.0, method="pav")
    errors = []
    for max_iter in (4, 64):
        # Stopped before its tolerance: an approximation, and a warning says so.
        with pytest.warns(tc.DykstraNotConverged, match="max_iter"):
            y, _ = FORWARD[operator](x, 20, p=2.0, regularization_strength=3.0, method="dykstra", max_iter=max_iter)
        assert np.all(np.isfinite(y))
        errors.append(np.abs(y - want).max())
    y, _ = FORWARD[operator](x, 20, p=2.0, regularization_strength=3.0, method="dykstra", max_iter=4096)
    errors.append(np.abs(y - want).max())
    assert errors[0] > 1e-6 and errors[2] <= 1e-9 and errors[1] <= errors[0]
    loose, _ = FORWARD[operator](x, 20, p=2.0, regularization_strength=3.0, method="dykstra", tol=1e-2)
    assert np.all(np.isfinite(loose))


def test_large_strength_pools_a_short_row_and_warns(rng):
    # 48 keys near 1e3, l = 0.02: the magnitude's saturation width l t ~ 20 exceeds the keys'
    # spread, every key pools, and the default budget is far too small (docs/methods.md).
    x = 1e3 + rng.normal(size=(10, 48))
    want, _ = FORWARD["mag"](x, 24, p=2.0, regularization_strength=0.02, method="pav")
    with pytest.warns(tc.DykstraNotConverged):
        y, _ = FORWARD["mag"](x, 24, p=2.0, regularization_strength=0.02, method="dykstra")
    assert np.abs(y - want).max() > 1.0
    y, _ = FORWARD["mag"](x, 24, p=2.0, regularization_strength=0.02, method="dykstra", max_iter=10_000)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=0)


def test_float32_rows_meet_the_tolerance(operator):
    # Float32 iterates near 1 move by a few ulps (~1e-7) for ever: counted as progress, the default
    # tolerance (1e-7 l) was never met by the magnitude, which ran max_iter and warned (pytest turns
    # the warning into an error); rounding is now discounted.
    x = np.random.default_rng(1).normal(size=(256, 64)).astype(np.float32)
    y, _ = FORWARD[operator](x, 8, p=2.0, regularization_strength=0.1, method="dykstra")
    want, _ = FORWARD[operator](x.astype(np.float64), 8, p=2.0, regularization_strength=0.1, method="pav")
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * max(1.0, float(np.abs(want).max())))


def test_jit_with_a_structured_loop(operator):
    jax = pytest.importorskip("jax")
    solver = {"mask": dykstra.dykstra_mask, "mag": dykstra.dykstra_mag}[operator]
    x = np.random.default_rng(5).normal(size=(5, 9))
    with jax.enable_x64(True):
        fn = jax.jit(lambda a: solver(a, 3, 0.5, 2.0, jax.numpy, loop=jax.lax.while_loop)[0])
        got = np.asarray(fn(jax.numpy.asarray(x)))
    want, _ = FORWARD[operator](x, 3, p=2.0, regularization_strength=0.5, method="pav")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


@pytest.mark.gpu
def test_cuda_tensors_stay_on_the_device(operator):
    torch = cuda_torch()
    x = torch.randn(64, 33, dtype=torch.float64, device="cuda")
    y, res = FORWARD[operator](x, 5, p=2.0, method="dykstra")
    assert y.device == x.device and res.gprime.device == x.device and res.perm.device == x.device
    want, _ = FORWARD[operator](x.cpu(), 5, p=2.0, method="pav")
    np.testing.assert_allclose(y.cpu().numpy(), want.numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("scale", "lam"), [(1e-10, 1.0), (1e-6, 1.0), (1e-2, 100.0)])
def test_magnitude_of_rows_small_next_to_the_strength(backend, scale, lam):
    # The magnitude's iterate is on the scale of |x|: with a stopping test of tol * l alone, rows of
    # |x| ~ 1e-6 at l = 1 stopped 1.5e-2 of their largest output off (an audit saw 45% on single
    # entries).  The unit of tol is now l min(1, c / (1 + l)), c the row's k-th |x|.
    x = np.random.default_rng(0).normal(size=(50, 16)) * scale
    y, res = FORWARD["mag"](backend.to(x), 4, p=2.0, regularization_strength=lam, method="dykstra")
    want, want_res = FORWARD["mag"](x, 4, p=2.0, regularization_strength=lam, method="pav")
    largest = np.abs(want).max(axis=-1, keepdims=True)
    print(f"|x| ~ {scale:g}, l = {lam:g}: off by {np.abs(backend.back(y) - want).max() / largest.max():.2g} of the largest output")
    np.testing.assert_allclose(backend.back(y) / largest, want / largest, rtol=0, atol=1e-6)
    t = np.random.default_rng(1).normal(size=x.shape)
    for products in (JVP, VJP):
        got = backend.back(products["mag"](res, backend.to(t)))
        np.testing.assert_allclose(got, products["mag"](want_res, t), rtol=1e-6, atol=1e-8)
