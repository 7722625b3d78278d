"""Host callbacks that own their output buffers: the core writes them in place, the JAX adapter copies nothing.

`topk_core._api.soft_forward_into` and `jacobian_product_into` take arrays that a caller owns (XLA's output
buffers in `topk_jax._host_call`) and let the PAV kernels write there.  Checked here: the results are the
same numbers as with fresh arrays and as the slow threshold oracle of `tests/_oracles.py`; they are the
buffers themselves where the fused kernels run (all-finite rows, either lane or selection route); rows with
NaN, and buffers of another dtype or layout, come back in arrays of their own, right, and the buffers are
not read; and a jitted JAX forward + VJP on the CPU copies nothing into XLA's buffers.
"""

from __future__ import annotations

import numpy as np
import pytest

import topk_core
from topk_core import MagResiduals, MaskResiduals, soft_topk_mag_forward, soft_topk_mask_forward
from topk_core._api import jacobian_product_into, shares_buffer, soft_forward_into

from ._oracles import threshold_mag_row, threshold_mask_row, threshold_rows
from ._rows import rows_of_kind

FORWARD = {"mask": soft_topk_mask_forward, "mag": soft_topk_mag_forward}
ORACLE = {"mask": threshold_mask_row, "mag": threshold_mag_row}
FIELDS = {"mask": ("gprime",), "mag": ("gprime", "codes", "offset")}
TYPES = {"mask": MaskResiduals, "mag": MagResiduals}
# Rows of 16 take the lane solver, rows of 700 the selection kernel (module `select`).
SHAPES = [(300, 16), (5, 700)]


def _buffers(operator: str, reference_res, y_like: np.ndarray):
    """Fresh arrays shaped like the forward's results, filled with garbage the kernels must overwrite."""
    y = np.full_like(y_like, 7.0)
    fields = {name: np.full_like(np.asarray(getattr(reference_res, name)), 3) for name in FIELDS[operator]}
    return y, TYPES[operator](None, None, None, None, **fields)


@pytest.mark.parametrize("shape", SHAPES, ids=["lanes", "selection"])
def test_forward_writes_the_buffers(operator, p, float_dtype, shape, rng):
    x = rows_of_kind(rng, *shape, "normal", float_dtype)
    k, lam = 3, 0.3
    expected_y, expected_res = FORWARD[operator](x, k, regularization_strength=lam, p=p)
    into = _buffers(operator, expected_res, expected_y)
    y, res = soft_forward_into(operator, x, k, into, regularization_strength=lam, p=p)
    assert shares_buffer(y, into[0])
    for name in FIELDS[operator]:
        assert shares_buffer(getattr(res, name), getattr(into[1], name)), name
        np.testing.assert_array_equal(getattr(res, name), getattr(expected_res, name))
    np.testing.assert_array_equal(y, expected_y)
    oracle = threshold_rows(ORACLE[operator], x.astype(np.float64), k, lam, p)
    np.testing.assert_allclose(y, oracle, atol=1e-5 if float_dtype == np.float32 else 1e-10)


def test_forward_without_residuals_writes_the_output(operator, rng):
    x = rows_of_kind(rng, 300, 16, "ties", np.float32)
    buffer = np.full_like(x, 7.0)
    y, res = soft_forward_into(operator, x, 4, (buffer, None), with_residuals=False)
    assert res is None and shares_buffer(y, buffer)
    np.testing.assert_array_equal(y, FORWARD[operator](x, 4)[0])


def test_nan_rows_come_back_in_arrays_of_their_own(operator, rng):
    x = rows_of_kind(rng, 40, 16, "normal", np.float64)
    x[7, 3] = np.nan
    expected_y, expected_res = FORWARD[operator](x, 3)
    into = _buffers(operator, expected_res, expected_y)
    y, res = soft_forward_into(operator, x, 3, into)
    assert not shares_buffer(y, into[0])
    assert np.isnan(y[7]).all() and not np.isnan(np.delete(y, 7, axis=0)).any()
    np.testing.assert_array_equal(y, expected_y)
    for name in FIELDS[operator]:
        np.testing.assert_array_equal(getattr(res, name), getattr(expected_res, name))


@pytest.mark.parametrize("misfit", ["dtype", "strided", "read-only"])
def test_buffers_that_do_not_fit_are_left_alone(operator, misfit, rng):
    x = rows_of_kind(rng, 64, 16, "normal", np.float32)
    expected_y, _ = FORWARD[operator](x, 2)
    if misfit == "dtype":
        buffer = np.zeros(x.shape, dtype=np.float64)
    elif misfit == "strided":
        buffer = np.zeros((64, 32), dtype=np.float32)[:, ::2]
    else:
        buffer = np.zeros_like(x)
        buffer.flags.writeable = False
    y, _ = soft_forward_into(operator, x, 2, (buffer, None), with_residuals=False)
    assert not np.any(buffer) and not shares_buffer(y, buffer)
    np.testing.assert_array_equal(y, expected_y)


@pytest.mark.parametrize("transpose", [False, True], ids=["jvp", "vjp"])
def test_products_write_the_buffer(operator, transpose, float_dtype, rng):
    x = rows_of_kind(rng, 300, 16, "normal", float_dtype)
    t = rng.normal(size=x.shape).astype(float_dtype)
    _, res = FORWARD[operator](x, 3, p=2.0)
    out = np.full_like(x, 5.0)
    got = jacobian_product_into(operator, transpose, res, t, out)
    assert shares_buffer(got, out)
    # Independent of the kernel: at p = 2 the Jacobian is read off a finite difference of the forward
    # (piecewise linear: exact up to rounding while no entry changes set).
    h = 1e-7  # in float64, around the float32 rows too: a step that moves no entry across a set boundary
    forward = FORWARD[operator]
    xd = x.astype(np.float64)
    if not transpose or operator == "mask":  # J t (the mask's J is symmetric)
        fd = (forward(xd + h * t, 3, p=2.0)[0] - forward(xd - h * t, 3, p=2.0)[0]) / (2 * h)
        np.testing.assert_allclose(got, fd, atol=1e-3 if float_dtype == np.float32 else 1e-6)
    else:  # J^T t, against <J^T t, e> = <t, J e> for random e
        e = rng.normal(size=x.shape)
        je = (forward(xd + h * e, 3, p=2.0)[0] - forward(xd - h * e, 3, p=2.0)[0]) / (2 * h)
        np.testing.assert_allclose(np.sum(got * e, axis=-1), np.sum(t * je, axis=-1), rtol=1e-3, atol=1e-3)


def test_jax_host_calls_copy_nothing(operator, monkeypatch):
    """A jitted forward + VJP on the CPU: the solve and the product write XLA's buffers (no np.copyto)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import topk_jax
    from topk_jax import _host_call, _host_products

    if _host_call._buffer_callback is None:
        pytest.skip("this JAX has no buffer_callback: results come back through jax.pure_callback")
    monkeypatch.setattr(_host_products, "HOST_PRODUCT_MIN_ENTRIES", 0)
    copies = []
    real_copyto = np.copyto

    class CountingNumpy:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def copyto(dst, src, **kwargs):
            copies.append(np.shape(src))
            real_copyto(dst, src, **kwargs)

    monkeypatch.setattr(_host_call, "np", CountingNumpy())
    x = np.random.default_rng(5).normal(size=(256, 16)).astype(np.float32)
    u = np.random.default_rng(6).normal(size=x.shape).astype(np.float32)
    f = getattr(topk_jax, f"soft_topk_{operator}")

    @jax.jit
    def forward_and_vjp(a, c):
        value, pullback = jax.vjp(lambda b: f(b, 3), a)
        return value, pullback(c)[0]

    y, grad = forward_and_vjp(jnp.asarray(x), jnp.asarray(u))
    expected_y, expected_res = FORWARD[operator](x, 3)
    np.testing.assert_array_equal(np.asarray(y), expected_y)
    vjp = getattr(topk_core, f"{operator}_vjp_from_residuals")
    np.testing.assert_array_equal(np.asarray(grad), vjp(expected_res, u))
    assert copies == []
    x[4, 2] = np.nan  # a NaN row: the core's results are new arrays, copied in
    y = jax.jit(lambda a: f(a, 3))(jnp.asarray(x))
    assert copies and np.isnan(np.asarray(y)[4]).all()
