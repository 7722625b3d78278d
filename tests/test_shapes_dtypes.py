"""Shapes, axes, dtypes, memory layouts and Array-API backends of the core."""

from __future__ import annotations

import numpy as np
import pytest

import topk_core
import topk_numpy as tk

from ._oracles import mag_jacobian, mask_jacobian
from ._subprocess import run_python

SOFT = {"mask": tk.soft_topk_mask, "mag": tk.soft_topk_mag}
HARD = {"mask": tk.hard_topk_mask, "mag": tk.hard_topk_mag}
VJP = {"mask": tk.soft_topk_mask_vjp, "mag": tk.soft_topk_mag_vjp}
JVP = {"mask": tk.soft_topk_mask_jvp, "mag": tk.soft_topk_mag_jvp}


def _row_by_row(fn, x, k, axis, **kw):
    moved = np.moveaxis(x, axis, -1)
    out = np.stack([fn(row, k, **kw) for row in moved.reshape(-1, moved.shape[-1])])
    return np.moveaxis(out.reshape(moved.shape), -1, axis)


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_3d_on_every_axis_equals_row_by_row(rng, operator, axis):
    x = rng.normal(size=(4, 5, 6))
    k = 2
    got = SOFT[operator](x, k, axis=axis, regularization_strength=0.7)
    assert got.shape == x.shape and got.dtype == x.dtype
    np.testing.assert_allclose(got, _row_by_row(SOFT[operator], x, k, axis, regularization_strength=0.7), atol=1e-14)
    np.testing.assert_array_equal(HARD[operator](x, k, axis=axis), _row_by_row(HARD[operator], x, k, axis))


@pytest.mark.parametrize(("n", "k"), [(1, 1), (5, 1), (5, 5), (6, 3)])
def test_edge_sizes(rng, operator, n, k):
    x = rng.normal(size=n)
    y = SOFT[operator](x, k)
    assert y.shape == (n,)
    if operator == "mask":
        assert abs(y.sum() - k) < 1e-12
    if k == n:
        np.testing.assert_array_equal(y, np.ones(n) if operator == "mask" else x)


def test_dtypes_are_preserved(rng, operator, float_dtype):
    x = rng.normal(size=(3, 8)).astype(float_dtype)
    assert SOFT[operator](x, 3).dtype == float_dtype
    assert HARD[operator](x, 3).dtype == float_dtype
    y, vjp_fn = getattr(tk, f"soft_topk_{operator}_vjp")(x, 3)
    assert y.dtype == float_dtype and vjp_fn(np.ones_like(x)).dtype == float_dtype


def test_float16_is_computed_in_float32(rng, operator):
    x = rng.normal(size=(3, 8)).astype(np.float16)
    y = SOFT[operator](x, 3, regularization_strength=0.5)
    assert y.dtype == np.float16
    expected = SOFT[operator](x.astype(np.float32), 3, regularization_strength=0.5).astype(np.float16)
    np.testing.assert_array_equal(y, expected)


def _as_f32(a: np.ndarray) -> np.ndarray:
    """bfloat16 values as float32 (exact), for NumPy's comparison helpers."""
    return np.asarray(a).astype(np.float32)


def test_bfloat16_is_computed_in_float32(rng, operator):
    """ml_dtypes' bfloat16 (what `np.asarray` gives for a JAX bfloat16 array) was refused with a TypeError
    whose message listed bfloat16: every function takes it, computes in float32 and returns bfloat16."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = rng.normal(size=(3, 8)).astype(bf16)
    u = rng.normal(size=(3, 8)).astype(bf16)
    x32, u32 = x.astype(np.float32), u.astype(np.float32)
    kw = {"regularization_strength": 0.5}
    for got, expected in (
        (SOFT[operator](x, 3, **kw), SOFT[operator](x32, 3, **kw)),
        (HARD[operator](x, 3), HARD[operator](x32, 3)),
        (VJP[operator](x, 3, **kw)[0], SOFT[operator](x32, 3, **kw)),
        (VJP[operator](x, 3, **kw)[1](u), VJP[operator](x32, 3, **kw)[1](u32)),
        (JVP[operator](x, u, 3, **kw)[0], SOFT[operator](x32, 3, **kw)),
        (JVP[operator](x, u, 3, **kw)[1], JVP[operator](x32, u32, 3, **kw)[1]),
    ):
        assert got.dtype == bf16 and got.shape == x.shape
        np.testing.assert_array_equal(_as_f32(got), _as_f32(expected.astype(bf16)))
    # The hard mask against a stable argsort of the float32 values (bfloat16 -> float32 is exact).
    order = np.argsort(-(np.abs(x32) if operator == "mag" else x32), axis=-1, kind="stable")[:, :3]
    keep = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    np.testing.assert_array_equal(_as_f32(HARD[operator](x, 3)), np.where(keep, x32 if operator == "mag" else 1.0, 0.0))


def test_bfloat16_matches_topk_jax(rng, operator):
    """The same bfloat16 input gives the same bfloat16 values in topk_numpy and topk_jax."""
    jax = pytest.importorskip("jax")
    tj = pytest.importorskip("topk_jax")
    jnp = jax.numpy
    x = jnp.asarray(rng.normal(size=(4, 9)), dtype=jnp.bfloat16)
    u = jnp.asarray(rng.normal(size=(4, 9)), dtype=jnp.bfloat16)
    x_np, u_np = np.asarray(x), np.asarray(u)
    assert x_np.dtype.name == "bfloat16"
    for name in (f"soft_topk_{operator}", f"hard_topk_{operator}"):
        got = getattr(tk, name)(x_np, 3)
        assert got.dtype == x_np.dtype and got.shape == x_np.shape
        np.testing.assert_array_equal(_as_f32(got), _as_f32(getattr(tj, name)(x, 3)))
    f = getattr(tj, f"soft_topk_{operator}")
    _, jax_vjp = jax.vjp(lambda a: f(a, 3), x)
    _, jax_y_dot = jax.jvp(lambda a: f(a, 3), (x,), (u,))
    _, vjp_fn = VJP[operator](x_np, 3)
    _, y_dot = JVP[operator](x_np, u_np, 3)
    # Both compute the products in float32 (summed in their own order) and round to bfloat16: within one
    # bfloat16 rounding (2^-8 relative) of each other.
    for got, expected in ((vjp_fn(u_np), jax_vjp(u)[0]), (y_dot, jax_y_dot)):
        assert got.dtype == x_np.dtype
        np.testing.assert_allclose(_as_f32(got), _as_f32(expected), rtol=2.0**-8, atol=1e-6)


_PRODUCT_TOL = {np.float16: 1e-2, np.float32: 1e-4, np.float64: 1e-10}


@pytest.mark.parametrize(
    ("x_dtype", "t_dtype"),
    [(np.float16, np.float64), (np.float32, np.float64), (np.float64, np.float32), (np.float32, np.float16)],
    ids=["x16-t64", "x32-t64", "x64-t32", "x32-t16"],
)
def test_products_come_back_in_the_dtype_of_x(rng, operator, x_dtype, t_dtype):
    """api.md: ``vjp_fn(cotangent) -> array like x``; the products came back in the (co)tangent's dtype.
    They are now cast to the dtype of `x` (as PyTorch's autograd casts a gradient), and their values are
    the closed-form Jacobian's (tests/_oracles.py) applied in float64."""
    k, lam, p = 2, 0.5, 4.0 / 3.0
    x = rng.normal(size=(3, 6)).astype(x_dtype)
    u = rng.normal(size=x.shape).astype(t_dtype)
    _, vjp_fn = VJP[operator](x, k, regularization_strength=lam, p=p)
    y, y_dot = JVP[operator](x, u, k, regularization_strength=lam, p=p)
    g = vjp_fn(u)
    for out in (y, y_dot, g):
        assert out.dtype == x_dtype and out.shape == x.shape
    x64, u64 = x.astype(np.float64), u.astype(np.float64)
    out64 = SOFT[operator](x64, k, regularization_strength=lam, p=p)
    for i in range(x.shape[0]):
        if operator == "mask":
            jac = mask_jacobian(out64[i], lam, p)
        else:
            jac = mag_jacobian(x64[i], out64[i], k, lam, p)
        tol = _PRODUCT_TOL[x_dtype]
        np.testing.assert_allclose(g[i].astype(np.float64), jac.T @ u64[i], rtol=tol, atol=tol)
        np.testing.assert_allclose(y_dot[i].astype(np.float64), jac @ u64[i], rtol=tol, atol=tol)


def test_the_core_points_numpy_bfloat16_to_topk_numpy():
    # The core takes Array-API dtypes; ml_dtypes' bfloat16 is not one (its message listed bfloat16 among the
    # allowed dtypes and refused it).  topk_numpy computes it in float32.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([[3.0, 1.0, 0.5]], dtype=ml_dtypes.bfloat16)
    for fn in (topk_core.soft_topk_mask, topk_core.hard_topk_mag):
        with pytest.raises(TypeError, match=r"ml_dtypes\.bfloat16, which is not an Array-API dtype: use topk_numpy"):
            fn(x, 1)
    y = tk.soft_topk_mask(x, 1)
    assert y.dtype == x.dtype
    np.testing.assert_allclose(y.astype(np.float64), tk.soft_topk_mask(x.astype(np.float32), 1), atol=1e-2)


def test_products_refuse_integer_tangents():
    # The error names the argument at fault (it said `x`, which was floating).
    x = np.array([3.0, 1.0, 0.5])
    for name in ("mask", "mag"):
        with pytest.raises(TypeError, match="`cotangent` must have a real floating dtype"):
            getattr(tk, f"soft_topk_{name}_vjp")(x, 1)[1](np.array([1, 0, 0]))
        with pytest.raises(TypeError, match="`tangent` must have a real floating dtype"):
            getattr(tk, f"soft_topk_{name}_jvp")(x, np.array([True, False, False]), 1)
        residuals = getattr(topk_core, f"soft_topk_{name}_forward")(x, 1)[1]
        with pytest.raises(TypeError, match="`cotangent` must have a real floating dtype"):
            getattr(topk_core, f"{name}_vjp_from_residuals")(residuals, np.array([1, 0, 0]))
        with pytest.raises(TypeError, match="`tangent` must have a real floating dtype"):
            getattr(topk_core, f"{name}_jvp_from_residuals")(residuals, np.array([1, 0, 0]))


def test_non_contiguous_and_read_only_inputs(rng, operator):
    base = rng.normal(size=(10, 12))
    x = base[::2, ::3]
    ro = base.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(SOFT[operator](x, 2), SOFT[operator](np.ascontiguousarray(x), 2))
    np.testing.assert_array_equal(SOFT[operator](ro, 2), SOFT[operator](base, 2))
    np.testing.assert_array_equal(SOFT[operator](x.T, 2, axis=0), SOFT[operator](np.ascontiguousarray(x.T), 2, axis=0))


def test_inputs_are_not_modified(rng, operator):
    x = rng.normal(size=(4, 7))
    x[0, 0] = np.nan
    copy = x.copy()
    SOFT[operator](x, 2)
    np.testing.assert_array_equal(x, copy)


def test_empty_batch(operator):
    x = np.zeros((0, 5))
    assert SOFT[operator](x, 2).shape == (0, 5)
    assert HARD[operator](x, 2).shape == (0, 5)


# Counts the Numba compilations of what it runs (a new, empty cache folder: nothing loads from a cache).
_COMPILATIONS = r"""
import importlib.util, sys
import numpy as np
from numba.core import event
import topk_core as tc

compiled = []

class Listener(event.Listener):
    def on_start(self, ev):
        pass

    def on_end(self, ev):
        compiled.append(ev.data["dispatcher"].py_func.__qualname__)

event.register("numba:compile", Listener())
operators = ((tc.soft_topk_mask_forward, tc.soft_topk_mask, 5), (tc.soft_topk_mag_forward, tc.soft_topk_mag, 7))
for dtype in (np.float32, np.float64):
    x = np.zeros((0, 6), dtype=dtype)
    for forward, value, fields in operators:
        y, res = forward(x, 2)
        assert len(res) == fields and res.gprime.shape == (0, 6) and res.gprime.dtype == dtype, res
        for out in (y, value(x, 2)):
            assert out.shape == (0, 6) and out.dtype == dtype
if "torch" in sys.argv[1:] and importlib.util.find_spec("torch"):
    from topk_torch import _ops
    for kind in ("mask", "mag"):
        _ops.layout(kind)
if "jax" in sys.argv[1:] and importlib.util.find_spec("jax"):
    import topk_jax
    from topk_jax import _soft
    static = topk_jax.Static(k=2, regularization_strength=0.1, p=4.0 / 3.0, method="pav", max_iter=None, tol=None)
    for op in (_soft._MASK, _soft._MAG):
        _soft._residual_layout(op, static, np.dtype(np.float32), 6)
print(compiled)
"""


def test_no_rows_compile_no_kernel(tmp_path):
    """A forward on no rows runs no kernel, and compiles none: the adapters read the residuals' layout off
    such a call (PyTorch's custom operators, JAX's host callback), where one of two rows of zeros compiled
    `lane_rows` and `_select_rows` in float64 (45 s on an empty cache) for callers of any dtype."""
    output = run_python(_COMPILATIONS, "torch", "jax", env={"NUMBA_CACHE_DIR": str(tmp_path)})
    assert output.strip().splitlines()[-1] == "[]"


def test_array_likes_are_accepted(operator):
    np.testing.assert_array_equal(SOFT[operator]([3.0, 1.0, 2.0], 1), SOFT[operator](np.array([3.0, 1.0, 2.0]), 1))


BACKENDS = ["torch", "jax.numpy", "array_api_strict"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_core_forward_on_other_array_api_backends(rng, operator, backend):
    lib = pytest.importorskip(backend)
    x_np = rng.normal(size=(3, 9)).astype(np.float32)
    x = lib.asarray(x_np)
    core_soft = getattr(topk_core, f"soft_topk_{operator}")
    core_hard = getattr(topk_core, f"hard_topk_{operator}")
    y = core_soft(x, 3, regularization_strength=0.5)
    assert type(y) is type(x)
    assert y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape)
    np.testing.assert_allclose(np.asarray(y), SOFT[operator](x_np, 3, regularization_strength=0.5), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(core_hard(x, 3)), HARD[operator](x_np, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_core_jacobian_products_on_other_backends(rng, operator, backend):
    lib = pytest.importorskip(backend)
    x_np = rng.normal(size=(2, 7))
    u_np = rng.normal(size=(2, 7))
    fwd = getattr(topk_core, f"soft_topk_{operator}_forward")
    vjp = getattr(topk_core, f"{operator}_vjp_from_residuals")
    _, res_np = fwd(x_np, 3, regularization_strength=2.0)
    expected = vjp(res_np, u_np)
    x = lib.asarray(x_np.astype(np.float32))
    _, res = fwd(x, 3, regularization_strength=2.0)
    got = vjp(res, lib.asarray(u_np.astype(np.float32)))
    assert type(got) is type(x)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_products_refuse_a_tangent_of_another_library():
    # A torch cotangent of NumPy residuals failed inside torch's `Tensor.to` ("received an invalid
    # combination of arguments").
    torch = pytest.importorskip("torch")
    x = np.array([[3.0, 1.0, 0.5, -2.0]])
    for name in ("mask", "mag"):
        residuals = getattr(topk_core, f"soft_topk_{name}_forward")(x, 2)[1]
        for product, arg in (("vjp", "cotangent"), ("jvp", "tangent")):
            with pytest.raises(TypeError, match=rf"`{arg}` is a torch.Tensor, but the residuals hold numpy.ndarray"):
                getattr(topk_core, f"{name}_{product}_from_residuals")(residuals, torch.ones(1, 4, dtype=torch.float64))
