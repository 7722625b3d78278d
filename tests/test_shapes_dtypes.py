"""Shapes, axes, dtypes, memory layouts and Array-API backends of the core."""

from __future__ import annotations

import numpy as np
import pytest

import topk_core
import topk_numpy as tk

from ._subprocess import run_python

SOFT = {"mask": tk.soft_topk_mask, "mag": tk.soft_topk_mag}
HARD = {"mask": tk.hard_topk_mask, "mag": tk.hard_topk_mag}


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
