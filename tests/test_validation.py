"""Bad input raises a clear TypeError/ValueError naming the argument, before any computation."""

from __future__ import annotations

import re

import numpy as np
import pytest

import topk_numpy as tk

X = np.arange(12.0).reshape(3, 4)
SOFT = [tk.soft_topk_mask, tk.soft_topk_mag]
ALL = [*SOFT, tk.hard_topk_mask, tk.hard_topk_mag]
ids = lambda f: f.__name__  # noqa: E731


@pytest.mark.parametrize("fn", ALL, ids=ids)
@pytest.mark.parametrize(("k", "error", "match"), [
    (0, ValueError, r"`k` must satisfy 1 <= k <= n = 4.*got k = 0"),
    (5, ValueError, r"`k` must satisfy 1 <= k <= n = 4.*got k = 5"),
    (-1, ValueError, "`k`"),
    (2.0, TypeError, r"`k` must be a Python int.*2\.0"),
    (True, TypeError, "`k`"),
    ("2", TypeError, "`k`"),
    (None, TypeError, "`k`"),
])
def test_bad_k(fn, k, error, match):
    with pytest.raises(error, match=match):
        fn(X, k)


def test_numpy_integer_k_is_accepted():
    np.testing.assert_array_equal(tk.soft_topk_mask(X, np.int64(2)), tk.soft_topk_mask(X, 2))


def _zero_d(library: str) -> tuple:
    """(k, strength, p) = (2, 0.5, 1.5) as 0-d arrays of `library` (skipped where it is not installed)."""
    if library == "numpy":
        return np.array(2), np.array(0.5), np.array(1.5)
    if library == "jax":
        jnp = pytest.importorskip("jax.numpy")
        return jnp.int32(2), jnp.float32(0.5), jnp.float32(1.5)
    torch = pytest.importorskip("torch")
    return torch.tensor(2), torch.tensor(0.5), torch.tensor(1.5)


@pytest.mark.parametrize("library", ["numpy", "jax", "torch"])
def test_concrete_0d_arrays_are_numbers(library):
    """k, p and the strength as 0-d arrays of any library (a strength kept as `jnp.float32(0.5)` or a
    `torch.tensor(2)`): their numbers, where the message said "must be a real number; got Array(0.5)"."""
    k, lam, p = _zero_d(library)
    want = tk.soft_topk_mag(X, 2, regularization_strength=0.5, p=1.5)
    np.testing.assert_allclose(tk.soft_topk_mag(X, k, regularization_strength=lam, p=p), want, rtol=1e-7)


def test_0d_arrays_that_are_not_numbers_are_refused():
    """Arrays of another shape, booleans, floats for k."""
    non_integers = [np.array([2]), np.array(True), np.array(2.0)]
    try:
        import jax.numpy as jnp
    except ImportError:
        pass
    else:
        non_integers.append(jnp.float32(2.0))
    for k in non_integers:
        with pytest.raises(TypeError, match="`k` must be a Python int"):
            tk.soft_topk_mask(X, k)
    for lam in (np.array([0.5]), np.array(True), np.array(0.5 + 0j)):
        with pytest.raises(TypeError, match="`regularization_strength` must be a real number"):
            tk.soft_topk_mask(X, 2, regularization_strength=lam)


def test_a_differentiated_parameter_is_named_as_such():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import topk_jax

    x = jnp.asarray(X)
    with pytest.raises(TypeError, match=r"traced by differentiation.*derivatives are with respect to x only"):
        jax.grad(lambda lam: topk_jax.soft_topk_mask(x, 2, regularization_strength=lam).sum())(0.5)
    with pytest.raises(TypeError, match=r"Under jax\.jit, pass it as a static argument"):
        jax.jit(lambda lam: topk_jax.soft_topk_mask(x, 2, regularization_strength=lam).sum())(0.5)


@pytest.mark.parametrize("fn", SOFT, ids=ids)
@pytest.mark.parametrize(("value", "error"), [
    (0.0, ValueError), (-1.0, ValueError), (np.inf, ValueError), (np.nan, ValueError), ("0.1", TypeError),
    (None, TypeError),
])
def test_bad_strength(fn, value, error):
    with pytest.raises(error, match="`regularization_strength`"):
        fn(X, 2, regularization_strength=value)


@pytest.mark.parametrize("fn", SOFT, ids=ids)
@pytest.mark.parametrize("method", ["threshold", "dykstra"])
def test_strength_below_the_dtype_of_the_array_api_methods(fn, method):
    # They compute in the input's dtype: 1e-50 is 0 in float32 (the threshold method returned NaN).
    x32 = np.array([[3.0, -3.0, 2.0, 2.0, -2.0, 2.0, 1.0, 0.5, 0.25]], dtype=np.float32)
    with pytest.raises(ValueError, match="`regularization_strength` = 1e-50 is below the smallest normal"):
        fn(x32, 5, regularization_strength=1e-50, p=2.0, method=method)
    # float64 holds it; PAV computes in float64 for float32 inputs too: both give the l -> 0 limit,
    # where the tied 2's share what is left.
    expected = fn(x32.astype(np.float64), 5, regularization_strength=1e-50, p=2.0, method="threshold")
    np.testing.assert_allclose(fn(x32, 5, regularization_strength=1e-50, p=2.0, method="pav"), expected, rtol=1e-7)
    if fn is tk.soft_topk_mag:
        np.testing.assert_allclose(expected[0, 2:6], [1.5, 1.5, -1.5, 1.5], rtol=1e-12)


@pytest.mark.parametrize("fn", SOFT, ids=ids)
@pytest.mark.parametrize(("value", "error"), [
    (1.0, ValueError), (0.5, ValueError), (-2.0, ValueError), (np.inf, ValueError), (np.nan, ValueError),
    ("2", TypeError),
])
def test_bad_p(fn, value, error):
    with pytest.raises(error, match="`p`"):
        fn(X, 2, p=value)


@pytest.mark.parametrize("fn", ALL, ids=ids)
@pytest.mark.parametrize(("axis", "error"), [(2, ValueError), (-3, ValueError), (1.0, TypeError), (None, TypeError)])
def test_bad_axis(fn, axis, error):
    with pytest.raises(error, match="`axis`"):
        fn(X, 2, axis=axis)


@pytest.mark.parametrize("fn", SOFT, ids=ids)
def test_bad_method(fn):
    with pytest.raises(ValueError, match="`method` must be one of"):
        fn(X, 2, method="sort")


@pytest.mark.parametrize("fn", SOFT, ids=ids)
@pytest.mark.parametrize("controls", [{"max_iter": 10}, {"tol": 1e-6}])
@pytest.mark.parametrize("method", ["pav", "auto"])
def test_iteration_controls_rejected_by_pav(fn, controls, method):
    with pytest.raises(ValueError, match="`max_iter` and `tol`"):
        fn(X, 2, method=method, **controls)


@pytest.mark.parametrize("fn", ALL, ids=ids)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex128])
def test_non_floating_dtypes(fn, dtype):
    with pytest.raises(TypeError, match="`x` must have a real floating dtype"):
        fn(np.ones((2, 3), dtype=dtype), 1)


@pytest.mark.parametrize(("library", "cast"), [
    ("numpy", "x.astype(numpy.float32)"), ("torch", "x.to(torch.float32)"),
    ("jax.numpy", "x.astype(jax.numpy.float32)"), ("array_api_strict", "xp.astype(x, xp.float32)"),
])
def test_integer_input_message_shows_the_cast_of_its_library(library, cast):
    """The cast that the message suggests is one the user's library has (a torch tensor has no `astype`)."""
    import topk_core

    arange = pytest.importorskip(library).arange
    with pytest.raises(TypeError, match=re.escape(f"e.g. {cast}.")):
        topk_core.soft_topk_mask(arange(5), 2)


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="longdouble is float64 on this platform")
@pytest.mark.parametrize("fn", ALL, ids=ids)
def test_longdouble_is_refused_not_computed_in_float32(fn):
    # It passed `isdtype(..., "real floating")` and was computed in float32 (ties 1e-9 apart at l = 1e-9
    # came back 1/3 each, where float64 separates them), then returned as float128.
    with pytest.raises(TypeError, match=r"`x` must have one of the floating dtypes .* got dtype float128"):
        fn(np.ones((2, 3), dtype=np.longdouble), 1)


@pytest.mark.parametrize("name", ["soft_topk_mask", "soft_topk_mag", "hard_topk_mask", "hard_topk_mag"])
def test_torch_float8_is_refused_by_every_operator(name):
    # The soft operators computed float8 in float32 and returned float8; the hard ones reached torch's
    # sort, which raised NotImplementedError.
    torch = pytest.importorskip("torch")
    import topk_torch

    x = torch.ones((2, 3)).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"`x` must have one of the floating dtypes .* got dtype torch\.float8_e4m3fn"):
        getattr(topk_torch, name)(x, 1)


@pytest.mark.parametrize("fn", ALL, ids=ids)
def test_empty_axis_and_scalar(fn):
    with pytest.raises(ValueError, match="empty axis"):
        fn(np.zeros((3, 0)), 1)
    with pytest.raises(ValueError, match="at least one dimension"):
        fn(np.float64(1.0), 1)


def test_object_input_raises_type_error():
    with pytest.raises(TypeError, match="`x`"):
        tk.soft_topk_mask(np.array(["a", "b"]), 1)


def test_core_rejects_non_arrays():
    import topk_core

    with pytest.raises(TypeError, match="`x` must be an array"):
        topk_core.soft_topk_mask([1.0, 2.0], 1)


@pytest.mark.parametrize("name", ["soft_topk_mask", "soft_topk_mag", "hard_topk_mask", "hard_topk_mag"])
def test_core_names_an_xp_of_another_library(name):
    # Was: "`x` must have a real floating dtype ...; got dtype torch.float32" for a float32 tensor.
    import array_api_strict
    import torch

    import topk_core

    fn = getattr(topk_core, name)
    with pytest.raises(TypeError, match=r"`xp` \(numpy\) is not the library of `x` \(torch\)"):
        fn(torch.ones(3), 1, xp=np)
    with pytest.raises(TypeError, match=r"`xp` \(array_api_strict\) is not the library of `x` \(numpy\)"):
        fn(np.ones(3), 1, xp=array_api_strict)
    with pytest.raises(TypeError, match=r"`x` must be an array of the library of `xp` \(numpy\); got list"):
        fn([1.0, 2.0], 1, xp=np)
    # A wrapper of the same library is that library; integer arrays still get the dtype message.
    import array_api_compat.numpy as compat_numpy

    assert np.asarray(fn(np.arange(3.0), 1, xp=compat_numpy)).shape == (3,)
    with pytest.raises(TypeError, match="real floating dtype"):
        fn(np.arange(3), 1, xp=compat_numpy)


def test_jacobian_products_name_an_xp_of_another_library():
    import torch

    import topk_core

    _, res = topk_core.soft_topk_mask_forward(np.arange(4.0), 2)
    with pytest.raises(TypeError, match=r"`xp` \(torch\) is not the library of `cotangent` \(numpy\)"):
        topk_core.mask_vjp_from_residuals(res, np.ones(4), xp=torch)


@pytest.mark.parametrize("name", ["soft_topk_mask_jvp", "soft_topk_mag_jvp"])
def test_jvp_tangent_must_match(name):
    with pytest.raises(ValueError, match="`tangent` must have the shape of `x`"):
        getattr(tk, name)(X, np.ones((4, 3)), 2)
    with pytest.raises(TypeError, match="floating"):
        getattr(tk, name)(X, np.ones((3, 4), dtype=np.int64), 2)


def test_validation_happens_before_any_computation(monkeypatch):
    import topk_core._api as api

    def boom(*args, **kwargs):
        raise AssertionError("solver called before validation")

    monkeypatch.setattr(api, "pav_mask", boom)
    with pytest.raises(ValueError, match="`p`"):
        tk.soft_topk_mask(X, 2, p=0.5)
