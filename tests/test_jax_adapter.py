"""topk_jax: values, dtypes, errors, transformations and derivatives of the JAX adapter."""

from __future__ import annotations

import inspect
import re
from functools import partial

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import topk_jax as tk  # noqa: E402
import topk_numpy as tn  # noqa: E402

from ._jax_helpers import rows, soft  # noqa: E402
from ._oracles import mag_jacobian, mask_jacobian  # noqa: E402

OPS = ["mask", "mag"]
NAMES = ["soft_topk_mask", "soft_topk_mag", "hard_topk_mask", "hard_topk_mag"]
P_VALUES = [4.0 / 3.0, 2.0, 1.5, 3.0]
P_IDS = ["p=4/3", "p=2", "p=3/2", "p=3"]




# --------------------------------------------------------------------------- API


@pytest.mark.parametrize("name", NAMES)
def test_signature_mirrors_numpy(name):
    def described(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert described(getattr(tk, name)) == described(getattr(tn, name))


def test_public_names():
    assert sorted(tk.__all__) == tk.__all__
    assert set(tk.__all__) == {"__version__", *NAMES}


# ------------------------------------------------------------------------ values


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("p", P_VALUES, ids=P_IDS)
@pytest.mark.parametrize(("shape", "axis"), [((7,), -1), ((9, 3), 0), ((2, 3, 8), 1), ((2, 3, 8), -1)])
def test_float64_matches_numpy(x64, op, p, shape, axis):
    x = rows(1, shape)
    k = max(1, shape[axis] // 3)
    want = soft(op, tn)(x, k, regularization_strength=0.3, p=p, axis=axis)
    got = soft(op)(jnp.asarray(x), k, regularization_strength=0.3, p=p, axis=axis)
    assert isinstance(got, jax.Array)
    assert got.dtype == jnp.float64
    assert got.shape == x.shape
    assert got.devices() == jnp.asarray(x).devices()
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_float32_matches_numpy_eager_and_jit(op):
    x = rows(2, (5, 12)).astype(np.float32)
    want = soft(op, tn)(x, 4)
    eager = soft(op)(x, 4)
    jitted = jax.jit(partial(soft(op), k=4))(jnp.asarray(x))
    assert eager.dtype == jitted.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(eager), want)
    np.testing.assert_array_equal(np.asarray(jitted), want)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_computed_in_float32(op, dtype):
    x = jnp.asarray(rows(3, (4, 10)), dtype=dtype)
    y = soft(op)(x, 3)
    assert y.dtype == x.dtype
    want = soft(op, tn)(np.asarray(x.astype(jnp.float32)), 3)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), np.asarray(jnp.asarray(want).astype(dtype), np.float32))
    grad = jax.jit(jax.grad(lambda x: soft(op)(x, 3).astype(jnp.float32).sum()))(x)
    assert grad.dtype == x.dtype
    assert np.isfinite(np.asarray(grad, np.float32)).all()


def test_array_likes_are_accepted():
    x = [3.0, 1.0, 0.9, -2.0]
    np.testing.assert_array_equal(
        np.asarray(tk.soft_topk_mask(x, 2)), tn.soft_topk_mask(np.asarray(x, np.float32), 2)
    )


@pytest.mark.parametrize("op", OPS)
def test_edge_shapes(op):
    x = rows(4, (3, 6)).astype(np.float32)
    for k in (1, 6):  # k = n: the mask is all ones, the magnitude operator the identity
        np.testing.assert_array_equal(np.asarray(soft(op)(x, k)), soft(op, tn)(x, k))
    one = soft(op)(jnp.ones((4, 1)), 1)
    assert one.shape == (4, 1)
    empty = soft(op)(jnp.ones((0, 5)), 2)
    assert empty.shape == (0, 5)
    assert jax.grad(lambda x: soft(op)(x, 2).sum())(jnp.ones((0, 5))).shape == (0, 5)


@pytest.mark.parametrize("op", OPS)
def test_nonfinite_rows_match_numpy_and_stay_confined(op):
    x = rows(5, (4, 7)).astype(np.float32)
    x[1, 3] = np.nan
    x[2, 0], x[2, 5] = np.inf, -np.inf
    got = np.asarray(soft(op)(x, 2))
    np.testing.assert_array_equal(got, soft(op, tn)(x, 2))
    assert np.isnan(got[1]).all()
    grad_fn = jax.jit(jax.grad(lambda x: (soft(op)(x, 2) * jnp.arange(7.0)).sum()))
    grad = np.asarray(grad_fn(jnp.asarray(x)))
    assert np.isnan(grad[1]).all()
    want = np.asarray(grad_fn(jnp.asarray(np.delete(x, 1, axis=0))))
    np.testing.assert_array_equal(np.delete(grad, 1, axis=0), want)


# ---------------------------------------------------------------------- errors

X_BAD = np.arange(12.0, dtype=np.float32).reshape(3, 4)
COMMON_BAD = [
    pytest.param(np.ones((2, 3), np.int32), 1, {}, id="int32"),
    pytest.param(np.ones((2, 3), np.bool_), 1, {}, id="bool"),
    pytest.param(np.array(1.0, np.float32), 1, {}, id="0-d"),
    pytest.param(np.ones((3, 0), np.float32), 1, {}, id="empty-axis"),
    pytest.param(X_BAD, 0, {}, id="k=0"),
    pytest.param(X_BAD, 5, {}, id="k>n"),
    pytest.param(X_BAD, 2.0, {}, id="k-float"),
    pytest.param(X_BAD, True, {}, id="k-bool"),
    pytest.param(X_BAD, None, {}, id="k-None"),
    pytest.param(X_BAD, 2, {"axis": 2}, id="axis-range"),
    pytest.param(X_BAD, 2, {"axis": 1.0}, id="axis-float"),
]
SOFT_BAD = [
    pytest.param(X_BAD, 2, {"regularization_strength": 0.0}, id="strength-0"),
    pytest.param(X_BAD, 2, {"regularization_strength": np.nan}, id="strength-nan"),
    pytest.param(X_BAD, 2, {"regularization_strength": "0.1"}, id="strength-str"),
    pytest.param(X_BAD, 2, {"p": 1.0}, id="p=1"),
    pytest.param(X_BAD, 2, {"p": np.inf}, id="p-inf"),
    pytest.param(X_BAD, 2, {"method": "sort"}, id="method"),
    pytest.param(X_BAD, 2, {"method": "pav", "max_iter": 10}, id="pav-max_iter"),
    pytest.param(X_BAD, 2, {"tol": 1e-6}, id="auto-tol"),
]


def _assert_same_error(name, x, k, kw):
    with pytest.raises((TypeError, ValueError)) as want:
        getattr(tn, name)(x, k, **kw)
    # The same message, but for the cast it suggests, written for the input's library.
    message = str(want.value).replace("x.astype(numpy.float32)", "x.astype(jax.numpy.float32)")
    with pytest.raises(want.type, match=f"^{re.escape(message)}$"):
        getattr(tk, name)(jnp.asarray(x), k, **kw)
    # Raised while tracing (JAX may append a note on filtered traceback frames).
    with pytest.raises(want.type, match=f"^{re.escape(message)}"):
        jax.jit(lambda x: getattr(tk, name)(x, k, **kw))(jnp.asarray(x))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("x", "k", "kw"), COMMON_BAD)
def test_bad_inputs_raise_like_numpy(name, x, k, kw):
    _assert_same_error(name, x, k, kw)


@pytest.mark.parametrize("name", NAMES[:2])
@pytest.mark.parametrize(("x", "k", "kw"), SOFT_BAD)
def test_bad_soft_parameters_raise_like_numpy(name, x, k, kw):
    _assert_same_error(name, x, k, kw)


@pytest.mark.parametrize("method", ["pav", "threshold", "auto"])
def test_subnormal_strength_is_refused_up_front(method):
    # XLA flushes subnormal numbers to 0: with "pav" the host callback read the strength as 0 and failed
    # inside XLA (a JaxRuntimeError wrapping the core's ValueError); NumPy and PyTorch take it.
    with jax.enable_x64(True), pytest.raises(ValueError, match=r"`regularization_strength` must be at least 2.2"):
        tk.soft_topk_mask(jnp.array([0.3, -1.2, 2.0, 0.7]), 2, regularization_strength=1e-310, method=method)


@pytest.mark.parametrize("name", NAMES)
def test_float8_is_refused(name):
    x = jnp.ones((2, 3), jnp.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"`x` must have one of the floating dtypes .* got dtype float8_e4m3fn"):
        getattr(tk, name)(x, 1)


def test_traced_k_is_rejected():
    with pytest.raises(TypeError, match="`k` must be a Python int"):
        jax.jit(lambda x, k: tk.soft_topk_mask(x, k))(jnp.ones(4), 2)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("method", ["auto", "pav", "threshold", "dykstra"])
def test_methods_are_passed_to_the_core(op, method):
    """Whatever the core does with `method` on NumPy input, the adapter does the same."""
    x = rows(6, (3, 9))
    u = np.random.default_rng(7).normal(size=x.shape)
    kw = {"p": 2.0, "regularization_strength": 0.5, "method": method}
    try:
        want, vjp_fn = getattr(tn, f"soft_topk_{op}_vjp")(x, 3, **kw)
    except ValueError as err:
        with pytest.raises(ValueError, match=re.escape(str(err))):
            soft(op)(jnp.asarray(x, jnp.float32), 3, **kw)
        return
    with jax.enable_x64(True):
        got, vjp = jax.vjp(partial(soft(op), k=3, **kw), jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(u))[0]), vjp_fn(u), rtol=0, atol=1e-12)


# --------------------------------------------------------------- transformations


@pytest.mark.parametrize("op", OPS)
def test_vmap_matches_a_loop(op):
    x = jnp.asarray(rows(8, (5, 4, 9)), jnp.float32)
    w = jnp.linspace(-1.0, 1.0, 36).reshape(4, 9)

    def f(r):
        return soft(op)(r, 2, axis=0, regularization_strength=0.5)

    def loss(r):
        return jnp.sum(f(r) ** 2 * w)

    f_row, grad_row = jax.jit(f), jax.jit(jax.grad(loss))
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), np.stack([np.asarray(f_row(r)) for r in x]))
    per_row = np.stack([np.asarray(grad_row(r)) for r in x])
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(loss))(x)), per_row, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(jax.grad(loss)))(x)), per_row, rtol=1e-5, atol=1e-6)
    nested = jax.vmap(jax.vmap(lambda r: soft(op)(r, 3), in_axes=1, out_axes=1))(x)
    np.testing.assert_array_equal(np.asarray(nested), np.asarray(soft(op)(x, 3, axis=1)))


@pytest.mark.parametrize("op", OPS)
def test_jit_matches_eager_for_derivatives(op):
    x = jnp.asarray(rows(9, (3, 8)), jnp.float32)
    t = jnp.asarray(np.random.default_rng(10).normal(size=(3, 8)), jnp.float32)
    f = partial(soft(op), k=3, regularization_strength=0.4)
    eager = jax.jvp(f, (x,), (t,))
    jitted = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, t)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(f(x) * t))
    np.testing.assert_allclose(np.asarray(grad(x)), np.asarray(jax.jit(grad)(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", OPS)
def test_jvp_and_vjp_match_numpy(x64, op):
    x = rows(11, (2, 3, 7))
    t = np.random.default_rng(12).normal(size=x.shape)
    kw = {"regularization_strength": 0.5, "axis": 1}
    f = jax.jit(partial(soft(op), k=2, **kw))
    y, y_dot = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(jnp.asarray(x), jnp.asarray(t))
    want_y, want_dot = getattr(tn, f"soft_topk_{op}_jvp")(x, t, 2, **kw)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(y_dot), want_dot, rtol=0, atol=1e-12)
    vjp = jax.jit(lambda x, u: jax.vjp(f, x)[1](u)[0])
    _, vjp_fn = getattr(tn, f"soft_topk_{op}_vjp")(x, 2, **kw)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(x), jnp.asarray(t))), vjp_fn(t), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ derivatives


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0, 3.0], ids=["p=4/3", "p=2", "p=3"])
def test_check_grads(x64, op, p):
    x = jnp.asarray(np.random.default_rng(13).normal(size=(3, 8)))
    f = jax.jit(partial(soft(op), k=3, regularization_strength=0.5, p=p))
    check_grads(f, (x,), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("p", P_VALUES, ids=P_IDS)
def test_jacfwd_equals_jacrev_equals_closed_form(x64, op, p):
    x = jnp.asarray(np.random.default_rng(14).normal(size=9) * 1.5)
    lam, k = 0.7, 3
    f = partial(soft(op), k=k, regularization_strength=lam, p=p)
    y = np.asarray(f(x))
    fwd, rev = np.asarray(jax.jit(jax.jacfwd(f))(x)), np.asarray(jax.jit(jax.jacrev(f))(x))
    if op == "mask":
        assert ((y > 0) & (y < 1)).sum() >= 2  # a non-trivial free set
        closed = mask_jacobian(y, lam, p)
    else:
        assert ((y != 0) & (y != np.asarray(x))).sum() >= 2
        closed = mag_jacobian(np.asarray(x), y, k, lam, p)
    np.testing.assert_allclose(fwd, rev, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fwd, closed, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
def test_jacobian_of_batched_input_is_block_diagonal(x64, op):
    x = jnp.asarray(rows(15, (4, 3)))
    f = partial(soft(op), k=2, axis=0, regularization_strength=0.6)
    jac = np.asarray(jax.jit(jax.jacrev(f))(x))  # (4, 3, 4, 3)
    column_jac = jax.jit(jax.jacfwd(f))
    for j in range(3):
        np.testing.assert_allclose(jac[:, j, :, j], np.asarray(column_jac(x[:, j : j + 1]))[:, 0, :, 0], atol=1e-12)
        off = np.delete(jac[:, j], j, axis=-1)
        assert not off.any()


@pytest.mark.parametrize("op", OPS)
def test_second_order_p2_is_exact(x64, op):
    """For p = 2 the operators are piecewise linear: their second derivative is 0 (a.e.)."""
    x = jnp.asarray(np.random.default_rng(16).normal(size=7))
    w = jnp.linspace(-1.0, 2.0, 7)
    f = partial(soft(op), k=3, p=2.0, regularization_strength=0.8)
    assert not np.asarray(jax.jit(jax.hessian(lambda x: jnp.sum(f(x) * w)))(x)).any()

    def loss(x):
        return jnp.sum(f(x) ** 2)

    jac = np.asarray(jax.jit(jax.jacfwd(f))(x))
    hess = np.asarray(jax.jit(jax.hessian(loss))(x))
    np.testing.assert_allclose(hess, 2.0 * jac.T @ jac, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.jacrev(jax.jacfwd(loss)))(x)), hess, rtol=0, atol=1e-12)
    hvp = jax.jit(jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), w)))(x)
    np.testing.assert_allclose(np.asarray(hvp), hess @ np.asarray(w), rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("method", "p"), [("pav", 8.0), ("threshold", 8.0), ("threshold", 12.0), ("pav", 3.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_reverse_mode_keeps_the_dominant_entry_exact(x64, op, method, p, dtype):
    """Rows where one entry holds most of the free set's g' (p > 2, an entry just inside the support): the
    products take that entry apart so that its terms of order g' cancel exactly, and JAX's transpose of the
    JVP brought two such terms back (from a term computed as 0).  `jax.vjp` under jit against NumPy's VJP
    (the core's Numba product) in float64, relative to each row's largest entry: before, up to 13 (float64)
    and 1e6 (float32) at p = 8 with PAV, 5e6 and 1e17 at p = 12."""
    gen = np.random.default_rng(5)
    x = gen.normal(size=(400, 4)).astype(dtype)
    u = gen.normal(size=x.shape).astype(dtype)
    fn = partial(soft(op), k=2, regularization_strength=0.1, p=p, method=method)
    got = np.asarray(jax.jit(lambda z, c: jax.vjp(fn, z)[1](c)[0])(jnp.asarray(x), jnp.asarray(u)))
    _, vjp = getattr(tn, f"soft_topk_{op}_vjp")(x.astype(np.float64), 2, regularization_strength=0.1, p=p,
                                                 method=method)
    want = vjp(u.astype(np.float64))
    scale = np.maximum(1.0, np.abs(want).max(axis=1, keepdims=True))
    np.testing.assert_array_less(np.abs(got - want) / scale, 1e-5 if dtype == np.float32 else 1e-12)


def test_gradient_of_a_lone_free_entry_at_large_p(x64):
    # The audit's case: k = 1, p = 12, the second entry alone in the free set with the first saturated.
    f = partial(tk.soft_topk_mask, k=1, regularization_strength=1.0, p=12.0)
    x = jnp.asarray([0.5, 0.3], jnp.float32)
    jac_fwd, jac_rev = jax.jacfwd(f)(x), jax.jacrev(f)(x)
    np.testing.assert_allclose(np.asarray(jac_rev), np.asarray(jac_fwd), rtol=1e-6, atol=1e-7)
    assert abs(float(jac_rev[1, 1])) > 0.3


# --------------------------------------------------------- pitfalls (spec §6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tied_saturated_entries_have_exactly_zero_vjp(dtype):
    with jax.enable_x64(dtype == "float64"):
        x = jnp.asarray([3.0, 1.0, 1.0, -2.0], dtype)
        u = jnp.asarray([0.3, -1.0, 0.7, 0.2], dtype)

        def f(x):
            return tk.soft_topk_mask(x, 1, regularization_strength=0.1, p=2.0)

        _, vjp = jax.vjp(f, x)
        assert (np.asarray(vjp(u)[0]) == 0).all()
        assert (np.asarray(jax.jit(jax.grad(lambda x: jnp.vdot(f(x), u)))(x)) == 0).all()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("p", [4.0 / 3.0, 1.25, 3.0], ids=["p=4/3", "p=5/4", "p=3"])
def test_exact_zeros_give_exact_zero_gradients_without_nan(op, p):
    x = jnp.asarray([5.0, 4.9, 0.0, -3.0, 0.0, 0.1, 2.0, -6.0], jnp.float32)
    w = jnp.linspace(0.5, 1.5, 8)
    f = partial(soft(op), k=3, p=p, regularization_strength=0.5)
    y = np.asarray(f(x))
    assert (y == 0).sum() >= 2
    grad = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(f(x) * w)))(x))
    jac = np.asarray(jax.jit(jax.jacfwd(f))(x))
    assert np.isfinite(grad).all()
    assert np.isfinite(jac).all()
    assert (grad[y == 0] == 0).all()
    assert (jac[y == 0] == 0).all()
    assert (jac[:, y == 0] == 0).all()
    if op == "mask":
        assert (grad[y == 1] == 0).all()


# ------------------------------------------------------------- hard operators


@pytest.mark.parametrize("name", NAMES[2:])
@pytest.mark.parametrize(("shape", "axis"), [((10,), 0), ((4, 9), -1), ((6, 2, 5), 0), ((3, 5, 7), 1)])
def test_hard_matches_numpy_with_ties(name, shape, axis):
    rng = np.random.default_rng(18)
    x = rng.integers(-3, 4, size=shape).astype(np.float32)  # many ties
    x = np.where((x == 0) & (rng.random(shape) < 0.5), np.float32(-0.0), x)  # -0.0 ties with +0.0
    want = getattr(tn, name)(x, 3, axis=axis)
    got = jax.jit(partial(getattr(tk, name), k=3, axis=axis))(jnp.asarray(x))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("name", NAMES[2:])
def test_hard_vmap_dtypes_and_nan_rows(name):
    x = np.random.default_rng(19).normal(size=(4, 8)).astype(np.float32)
    x[2, 5] = np.nan
    fn = getattr(tk, name)
    np.testing.assert_array_equal(np.asarray(jax.vmap(partial(fn, k=2))(jnp.asarray(x))), getattr(tn, name)(x, 2))
    for dtype in ("float16", "bfloat16"):
        half = jnp.asarray(x, dtype)
        got = jax.jit(partial(fn, k=2))(half)
        assert got.dtype == half.dtype
        want = getattr(tn, name)(np.asarray(half, np.float32), 2)
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_hard_gradients():
    x = jnp.asarray(np.random.default_rng(20).normal(size=(3, 7)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(21).normal(size=(3, 7)), jnp.float32)
    grad_mask = jax.jit(jax.grad(lambda x: jnp.sum(tk.hard_topk_mask(x, 3) * w)))(x)
    assert not np.asarray(grad_mask).any()
    grad_mag = jax.jit(jax.grad(lambda x: jnp.sum(tk.hard_topk_mag(x, 3) * w)))(x)
    np.testing.assert_array_equal(np.asarray(grad_mag), np.asarray(w * tk.hard_topk_mask(jnp.abs(x), 3)))
    jac = jax.jit(jax.jacfwd(partial(tk.hard_topk_mag, k=2)))(x[0])
    np.testing.assert_array_equal(np.asarray(jac), np.diag(np.asarray(tk.hard_topk_mask(jnp.abs(x[0]), 2))))


@pytest.mark.parametrize(("argument", "value"), [("k", 2), ("regularization_strength", 0.5), ("p", 1.5)])
def test_traced_parameters_are_refused_with_a_hint(argument, value):
    # k, p and the strength set the computation: traced by jax.jit they are refused, and the message says how to
    # make them static.
    def call(v, traced):
        parameters = {"k": 2, argument: traced}
        return tk.soft_topk_mask(v, parameters.pop("k"), **parameters)

    with pytest.raises(TypeError, match=f"`{argument}` must be .*a traced value. Under jax.jit, pass it as a static"):
        jax.jit(call)(jnp.arange(6.0), value)
    np.testing.assert_allclose(jax.jit(call, static_argnames="traced")(jnp.arange(6.0), value).sum(), 2.0, rtol=1e-6)
