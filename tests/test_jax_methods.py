"""topk_jax with methods "threshold" and "dykstra": native `jax.numpy` solvers, no host callback.

Values and derivatives are compared with `topk_numpy`'s exact PAV; the
device rule of ``method="auto"`` is tested through the resolver (this
machine may have no accelerator).
"""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import topk_core as tc  # noqa: E402
import topk_jax as tk  # noqa: E402
import topk_numpy as tn  # noqa: E402
from topk_core import _validate  # noqa: E402
from topk_jax import _soft  # noqa: E402

from ._jax_helpers import rows, soft  # noqa: E402

OPS = ["mask", "mag"]
# (method, p): threshold for any p, dykstra for p = 2 only.
CASES = [
    pytest.param("threshold", 4.0 / 3.0, id="threshold-p=4/3"),
    pytest.param("threshold", 2.0, id="threshold-p=2"),
    pytest.param("threshold", 3.0, id="threshold-p=3"),
    pytest.param("dykstra", 2.0, id="dykstra-p=2"),
]
ATOL = {"threshold": 1e-10, "dykstra": 1e-6}  # dykstra: approximate, default tol 1e-7
LAM = 0.3




def jaxpr_text(fn, *args) -> str:
    # A fresh function each time: no trace cached from an earlier call.
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


# ------------------------------------------------------------------------ values


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("method", "p"), CASES)
@pytest.mark.parametrize(("shape", "axis"), [((7,), -1), ((9, 3), 0), ((2, 3, 8), 1)])
def test_float64_matches_pav(x64, op, method, p, shape, axis):
    x = rows(1, shape)
    k = max(1, shape[axis] // 3)
    kw = {"regularization_strength": LAM, "p": p, "axis": axis}
    want = soft(op, tn)(x, k, method="pav", **kw)
    xj = jnp.asarray(x)
    got = soft(op)(xj, k, method=method, **kw)
    assert got.dtype == jnp.float64 and got.shape == x.shape
    assert got.devices() == xj.devices()
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL[method])
    jitted = jax.jit(partial(soft(op), k=k, method=method, **kw))(xj)
    np.testing.assert_allclose(np.asarray(jitted), want, rtol=0, atol=ATOL[method])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0, 3.0], ids=["p=4/3", "p=2", "p=3"])
def test_threshold_starts_from_top_k_on_accelerators_only(x64, monkeypatch, op, p):
    """On a GPU or TPU the threshold method starts at PAV's first block, from `jax.lax.top_k` (on the CPU
    XLA's top_k costs more than the iterations it saves); either way it agrees with PAV, NaN and
    infinite rows included."""
    for backend, shape in (("cpu", (16, 12)), ("gpu", (15, 12))):  # shapes of their own: no cached trace
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        x = rows(3, shape)
        x[1, 3], x[2, 0] = np.nan, np.inf
        want = soft(op, tn)(x, 3, regularization_strength=LAM, p=p, method="pav")
        fn = partial(soft(op), k=3, regularization_strength=LAM, p=p, method="threshold")
        assert ("top_k" in jaxpr_text(fn, jnp.asarray(x))) is (backend == "gpu")
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(jnp.asarray(x))), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
def test_threshold_nan_and_inf_rows_match_pav(x64, op):
    x = rows(2, (4, 6))
    x[1, 3] = np.nan
    x[2, 0], x[2, 4] = np.inf, -np.inf
    x[3, :] = 0.0
    x[3, 1] = 2.0  # at most k non-zero entries
    want = soft(op, tn)(x, 2, regularization_strength=LAM, method="pav")
    got = jax.jit(partial(soft(op), k=2, regularization_strength=LAM, method="threshold"))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("method", ["threshold", "dykstra"])
def test_float32_and_bfloat16(op, method):
    x = rows(3, (4, 10))
    kw = {"regularization_strength": LAM, "p": 2.0}
    want = soft(op, tn)(x, 3, method="pav", **kw)
    got = soft(op)(jnp.asarray(x, jnp.float32), 3, method=method, **kw)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)
    half = soft(op)(jnp.asarray(x, jnp.bfloat16), 3, method=method, **kw)
    assert half.dtype == jnp.bfloat16


@pytest.mark.parametrize("op", OPS)
def test_iteration_controls_reach_the_solver(x64, op):
    """A tiny `max_iter` changes the Dykstra result exactly as in NumPy; the default converges."""
    x = np.linspace(1.0, 0.0, 24)[None, :] + 1e-3 * rows(4, (1, 24))  # a long pooled block
    kw = {"regularization_strength": 2.0, "p": 2.0, "method": "dykstra"}
    pav = soft(op, tn)(x, 8, regularization_strength=2.0, p=2.0, method="pav")
    short = jax.jit(partial(soft(op), k=8, max_iter=2, **kw))(jnp.asarray(x))
    with pytest.warns(tc.DykstraNotConverged):  # NumPy arrays can be read: stopped early, it says so
        short_np = soft(op, tn)(x, 8, max_iter=2, **kw)
    np.testing.assert_allclose(np.asarray(short), short_np, rtol=0, atol=1e-12)
    assert np.abs(np.asarray(short) - pav).max() > 1e-6
    full = jax.jit(partial(soft(op), k=8, max_iter=100_000, tol=1e-12, **kw))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(full), pav, rtol=0, atol=1e-9)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("method", ["threshold", "dykstra", "pav"])
def test_eager_calls_compile_the_solver_once_per_shape(op, method):
    """Un-jitted, the solver runs as one compiled program: a few compilations for the first call of a
    shape (the solver, the layout's reshapes), none for the next, nor for a VJP after its first.
    Dispatched operation by operation, the first call compiled 27-101 small XLA programs (one per
    distinct operation and shape), and every call dispatched the threshold method's ~1,500 operations
    again; PAV's host callback was a new object at every call, which compiled its program again (an
    eager forward on (8192, 16) float32 rows took 20-21 ms instead of 1.6-2, docs/jax.md)."""
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    x = jnp.asarray(rows(14, (5, 13)), jnp.float32)
    shifted = x + 0.5
    cotangent = jnp.asarray(rows(15, (5, 13)), jnp.float32)
    f = partial(soft(op), k=3, regularization_strength=LAM, p=2.0, method=method)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = np.asarray(f(x))
        first_count = len(compiled)
        second = np.asarray(f(shifted))
        second_count = len(compiled)
        jax.vjp(f, x)[1](cotangent)[0].block_until_ready()
        vjp_count = len(compiled)
        (grad,) = jax.vjp(f, shifted)[1](cotangent)
        grad = np.asarray(grad)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert 1 <= first_count <= 10, first_count
    assert second_count == first_count
    assert len(compiled) == vjp_count
    want, vjp = getattr(tn, f"soft_topk_{op}_vjp")(np.asarray(shifted), 3, regularization_strength=LAM, p=2.0)
    np.testing.assert_allclose(first, soft(op, tn)(np.asarray(x), 3, regularization_strength=LAM, p=2.0), atol=1e-5)
    np.testing.assert_allclose(second, want, atol=1e-5)
    np.testing.assert_allclose(grad, vjp(np.asarray(cotangent)), atol=1e-4)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("method", "p"), CASES)
def test_eager_calls_compile_once_for_every_strength(op, method, p):
    """The strength is an argument of the compiled solver, not part of its configuration: eager calls
    (and VJPs) with new strengths, e.g. annealed during training (docs/choosing.md), reuse the first
    call's programs.  With the strength static, every new one compiled a new solver (about 3 s and 277
    memory maps each on the CPU), until the process ran out of memory maps and aborted (LLVM ERROR:
    Unable to allocate section memory!)."""
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    x = jnp.asarray(rows(16, (3, 11)), jnp.float32)  # a shape no other test compiles
    cotangent = jnp.asarray(rows(17, (3, 11)), jnp.float32)
    strengths = [0.1 + 0.013 * i for i in range(5)]
    forward, backward, values, grads = [], [], [], []
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for lam in strengths:
            f = partial(soft(op), k=3, regularization_strength=lam, p=p, method=method)
            before = len(compiled)
            values.append(np.asarray(f(x)))
            forward.append(len(compiled) - before)
            before = len(compiled)
            grads.append(np.asarray(jax.vjp(f, x)[1](cotangent)[0]))
            backward.append(len(compiled) - before)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert forward[0] >= 1 and forward[1:] == [0] * 4, forward
    assert backward[1:] == [0] * 4, backward
    for lam, y, grad in zip(strengths, values, grads, strict=True):
        kw = {"regularization_strength": lam, "p": p}
        want, vjp = getattr(tn, f"soft_topk_{op}_vjp")(np.asarray(x), 3, method="pav", **kw)
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-5, err_msg=f"l = {lam}")
        np.testing.assert_allclose(grad, vjp(np.asarray(cotangent)), rtol=0, atol=1e-4, err_msg=f"l = {lam}")


def large_rows(dtype, scale: float) -> np.ndarray:
    """Rows of keys of order `scale`: the issue's row, and random rows with tied |x| and pooled blocks."""
    x = np.random.default_rng(21).normal(size=(24, 9))
    x[:12] = np.round(x[:12] * 4.0) / 4.0
    x[:, 1] = -x[:, 0]
    issue = [1.7, -1.7, 1.6, 1.0, 0.3, 0.2, -0.1, 0.05, 0.0]
    return (np.concatenate([[issue], x]) * scale).astype(dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lam", [0.1, 1.0])
@pytest.mark.parametrize(
    ("dtype", "scale"), [(np.float32, 1e6), (np.float64, 1e14), (np.float64, 1e100)],
    ids=["float32-1e6", "float64-1e14", "float64-1e100"],
)
def test_dykstra_matches_pav_at_large_scales(x64, op, lam, dtype, scale):
    """Dykstra's blocks are read from its iterate, whose round-off grows with |x| (the magnitude's):
    with an absolute block tolerance (in units of l only) the converged block was split, 12% off PAV
    (the issue's row: 1.7e6, -1.414e6, 3.14e5 for 1.5125e6, -1.5125e6, 4.125e5; tied |x| differed),
    from 1e6 in float32 and 1e14 in float64, eager and jitted alike."""
    x = large_rows(dtype, scale)
    kw = {"regularization_strength": lam, "p": 2.0}
    want = soft(op, tn)(x.astype(np.float64), 3, method="pav", **kw)
    atol = 8 * np.finfo(dtype).eps * np.abs(want).max()
    f = partial(soft(op), k=3, method="dykstra", **kw)
    eager, jitted = f(jnp.asarray(x)), jax.jit(f)(jnp.asarray(x))
    for got in (eager, jitted):
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=atol)
    if op == "mag":  # tied |x| (columns 0 and 1) get tied outputs
        np.testing.assert_array_equal(np.abs(np.asarray(eager)[:, 0]), np.abs(np.asarray(eager)[:, 1]))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("method", "p"), CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_at_the_top_of_the_float_range(x64, op, method, p, dtype):
    """The magnitude's frame scales |x| by 2^-e into [1, 2), with e at most the largest exponent less 1,
    which was taken as floor(log2(max)), 1024 (float64) and 128 (float32), not 1023 and 127: rows whose
    largest |x| lies in [2^(emax), max] were scaled by a subnormal number, which XLA on the CPU flushes
    to 0, and came back unchanged (6 non-zero outputs for k = 2).  NumPy keeps subnormals: the oracle
    is PAV there, in float64 on the same values."""
    top = float(np.finfo(dtype).max)
    x = (np.array([[0.95, -0.67, 0.5, 0.28, 0.06, -0.017], [0.99, 0.6, -0.6, 0.1, 0.0, -0.5]]) * top).astype(dtype)
    kw = {"regularization_strength": 1.0, "p": p}
    want = soft(op, tn)(x.astype(np.float64), 2, method="pav", **kw)
    f = partial(soft(op), k=2, method=method, **kw)
    scale = 1.0 if op == "mask" else top
    for got in (f(jnp.asarray(x)), jax.jit(f)(jnp.asarray(x))):
        assert got.dtype == dtype
        got = np.asarray(got, np.float64)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=max(ATOL[method], 64 * np.finfo(dtype).eps))



# Rows whose k-th place lies far below their largest key, and an ordinary row, in one batch (k = 3).
_DEEP_BATCH = {
    np.float64: [[1e250, 1e-250, 3e-251, -2e-251, 5e-251, 0.0], [1e300, -1e100, 5e-10, 1e-300, 2e-301, -3e-301]],
    np.float32: [[1e20, 1e-20, 3e-21, -2e-21, 5e-21, 0.0], [3e38, 1e10, 1e-20, 3e-21, -2e-30, 1e-30]],
}


@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0, 3.0], ids=["p=4/3", "p=2", "p=3"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_threshold_mag_far_below_the_largest_key(x64, p, dtype):
    """The magnitude's rows framed again without their largest keys (`threshold._mag_deep_frames`) in the
    adapter's `while_loop`, jitted and eager, with the gradient: before it, the keys near the threshold
    vanished in the frame of the largest and came back 0.  Oracle: PAV on the same values in float64."""
    x = np.concatenate([np.array(_DEEP_BATCH[dtype]), rows(3, (1, 6))]).astype(dtype)
    x64_ = x.astype(np.float64)
    u = np.random.default_rng(4).normal(size=x.shape)
    kw = {"regularization_strength": 1.0, "p": p}
    want, vjp_fn = tn.soft_topk_mag_vjp(x64_, 3, method="pav", **kw)
    f = partial(tk.soft_topk_mag, k=3, method="threshold", **kw)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    for got in (f(jnp.asarray(x)), jax.jit(f)(jnp.asarray(x))):
        assert got.dtype == dtype
        bad = np.abs(np.asarray(got, np.float64) - want) > rtol * np.abs(x64_)
        assert not bad.any(), (np.asarray(got)[bad], want[bad])
    if dtype == np.float64:
        grad = jax.jit(jax.grad(lambda x: jnp.vdot(f(x), jnp.asarray(u))))(jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(grad), vjp_fn(u), rtol=1e-9, atol=1e-12)

# --------------------------------------------------------------- no host callback


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("method", "p"), CASES)
def test_no_callback_in_the_jaxpr(op, method, p):
    x = jnp.asarray(rows(5, (3, 9)), jnp.float32)
    f = partial(soft(op), k=3, regularization_strength=LAM, p=p, method=method)
    for text in (
        jaxpr_text(f, x),
        jaxpr_text(jax.grad(lambda x: jnp.sum(f(x) ** 2)), x),
        jaxpr_text(jax.vmap(f), x),
    ):
        assert "callback" not in text
        assert "while" in text


def test_pav_still_uses_the_callback():
    x = jnp.asarray(rows(5, (3, 9)), jnp.float32)
    assert "callback" in jaxpr_text(partial(tk.soft_topk_mask, k=3, method="pav"), x)


@pytest.mark.parametrize("method", ["threshold", "dykstra"])
def test_loop_is_not_unrolled(method):
    """The jaxpr does not grow with `max_iter` (only a literal changes): the solver loop is one `while`."""
    x = jnp.asarray(rows(6, (2, 8)), jnp.float32)

    def shape_of(max_iter):
        text = jaxpr_text(partial(tk.soft_topk_mask, k=2, p=2.0, method=method, max_iter=max_iter), x)
        return re.sub(r"\d+", "0", text)

    assert shape_of(3) == shape_of(5000)


# --------------------------------------------------------------- transformations


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("method", "p"), CASES)
def test_grad_jvp_match_pav(x64, op, method, p):
    x = rows(7, (3, 8))
    u = np.random.default_rng(8).normal(size=x.shape)
    kw = {"regularization_strength": LAM, "p": p}
    want, vjp_fn = getattr(tn, f"soft_topk_{op}_vjp")(x, 3, method="pav", **kw)
    _, want_jvp = getattr(tn, f"soft_topk_{op}_jvp")(x, u, 3, method="pav", **kw)
    f = partial(soft(op), k=3, method=method, **kw)
    grad = jax.jit(jax.grad(lambda x: jnp.vdot(f(x), jnp.asarray(u))))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), vjp_fn(u), rtol=0, atol=ATOL[method] * 10)
    y, y_dot = jax.jit(partial(jax.jvp, f))((jnp.asarray(x),), (jnp.asarray(u),))
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=ATOL[method])
    np.testing.assert_allclose(np.asarray(y_dot), want_jvp, rtol=0, atol=ATOL[method] * 10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("method", "p"), CASES)
def test_vmap_matches_batched_call(x64, op, method, p):
    x = jnp.asarray(rows(9, (4, 3, 9)))
    f = partial(soft(op), k=3, regularization_strength=LAM, p=p, method=method)
    batched = jax.jit(f)(x)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(f))(x)), np.asarray(batched), rtol=0, atol=1e-12)

    def loss(r):
        return jnp.sum(f(r) ** 2 * jnp.arange(9.0))

    grad_row = jax.jit(jax.grad(loss))
    per_row = np.stack([np.asarray(grad_row(r)) for r in x])
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(jax.grad(loss)))(x)), per_row, rtol=0, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("method", "p"), CASES)
def test_jacfwd_equals_jacrev(x64, op, method, p):
    x = jnp.asarray(rows(10, (2, 7)))
    f = partial(soft(op), k=2, regularization_strength=LAM, p=p, method=method)
    fwd = jax.jit(jax.jacfwd(f))(x)
    rev = jax.jit(jax.jacrev(f))(x)
    np.testing.assert_allclose(np.asarray(fwd), np.asarray(rev), rtol=0, atol=1e-12)
    want = np.stack([
        np.asarray(getattr(tn, f"soft_topk_{op}_jvp")(np.asarray(x), np.eye(14)[i].reshape(2, 7), 2,
                                                       regularization_strength=LAM, p=p, method="pav")[1])
        for i in range(14)
    ], axis=-1).reshape(2, 7, 2, 7)
    np.testing.assert_allclose(np.asarray(fwd), want, rtol=0, atol=ATOL[method] * 10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("method", ["threshold", "dykstra"])
def test_second_order(x64, op, method):
    x = jnp.asarray(rows(11, (6,)))

    def loss(x, p):
        return jnp.sum(soft(op)(x, 2, regularization_strength=LAM, p=p, method=method) ** 2)

    hess = jax.jit(jax.hessian(partial(loss, p=2.0)))(x)
    assert hess.shape == (6, 6) and bool(jnp.all(jnp.isfinite(hess)))
    # p != 2 (threshold only: Dykstra is p = 2 only): tests/test_second_order.py against the closed forms.


def test_explicit_sharding_is_kept():
    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch", None))
    x = jnp.asarray(rows(12, (4 * jax.device_count(), 9)), jnp.float32)
    xs = jax.device_put(x, sharding)
    f = jax.jit(jax.grad(lambda x: jnp.sum(tk.soft_topk_mag(x, 3, method="threshold") ** 2)))
    g = f(xs)
    assert g.sharding.spec == sharding.spec
    np.testing.assert_allclose(np.asarray(g), np.asarray(f(x)), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ errors

X_BAD = np.arange(6.0)
BAD = [
    pytest.param({"method": "dykstra", "p": 4.0 / 3.0}, id="dykstra-p=4/3"),
    pytest.param({"method": "dykstra", "p": 3.0}, id="dykstra-p=3"),
    pytest.param({"method": "threshold", "max_iter": 0}, id="max_iter-0"),
    pytest.param({"method": "dykstra", "p": 2.0, "max_iter": -3}, id="max_iter-negative"),
    pytest.param({"method": "threshold", "max_iter": 2.5}, id="max_iter-float"),
    pytest.param({"method": "threshold", "max_iter": True}, id="max_iter-bool"),
    pytest.param({"method": "threshold", "tol": 0.0}, id="tol-0"),
    pytest.param({"method": "dykstra", "p": 2.0, "tol": -1e-3}, id="tol-negative"),
    pytest.param({"method": "threshold", "tol": np.nan}, id="tol-nan"),
    pytest.param({"method": "threshold", "tol": "1e-6"}, id="tol-str"),
    pytest.param({"method": "auto", "max_iter": 5}, id="auto-max_iter"),
    pytest.param({"method": "pav", "tol": 1e-6}, id="pav-tol"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kw", BAD)
def test_bad_inputs_raise_like_numpy(op, kw):
    with pytest.raises((TypeError, ValueError)) as want:
        soft(op, tn)(X_BAD, 2, **kw)
    with pytest.raises(want.type, match=f"^{re.escape(str(want.value))}$"):
        soft(op)(jnp.asarray(X_BAD), 2, **kw)
    with pytest.raises(want.type, match=f"^{re.escape(str(want.value))}"):
        jax.jit(lambda x: soft(op)(x, 2, **kw))(jnp.asarray(X_BAD))


# ------------------------------------------------------------- method="auto"


class _FakeDevice:
    def __init__(self, platform):
        self.platform = platform


class _FakeArray:
    def __init__(self, *platforms):
        self._devices = {_FakeDevice(p) for p in platforms}

    def devices(self):
        return self._devices


def test_auto_rule_for_concrete_arrays():
    assert _soft.auto_method(jnp.ones(3)) == "pav"  # this machine: CPU
    assert _soft.auto_method(_FakeArray("cpu")) == "pav"
    assert _soft.auto_method(_FakeArray("gpu")) == "threshold"
    assert _soft.auto_method(_FakeArray("tpu")) == "threshold"
    assert _soft.auto_method(_FakeArray("cpu", "gpu")) == "threshold"


def test_auto_rule_for_tracers(monkeypatch):
    seen = []
    jax.jit(lambda x: seen.append(_soft.auto_method(x)) or x)(jnp.ones(3))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    jax.jit(lambda x: seen.append(_soft.auto_method(x)) or x)(jnp.ones(3))
    # A mesh names its platform: it wins over the default backend.
    mesh = jax.make_mesh((1,), ("b",))
    xs = jax.device_put(jnp.ones(4), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("b")))
    jax.jit(lambda x: seen.append(_soft.auto_method(x)) or x)(xs)
    assert seen == ["pav", "threshold", "pav"]


@pytest.mark.parametrize("op", OPS)
def test_auto_runs_threshold_on_device_without_callback(monkeypatch, op):
    x = jnp.asarray(rows(13, (3, 9)), jnp.float32)
    f = partial(soft(op), k=3, regularization_strength=LAM)
    assert "callback" in jaxpr_text(f, x)  # CPU: PAV on the host
    monkeypatch.setattr(_soft, "device_platforms", lambda x: frozenset({"gpu"}))
    assert "callback" not in jaxpr_text(f, x)
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda x: f(x))(x)), soft(op, tn)(np.asarray(x), 3, regularization_strength=LAM), rtol=0, atol=1e-5
    )
    # The errors name what "auto" picks on that device, as the core does for a device array.
    with pytest.raises(ValueError) as want:
        _validate.check_method("auto", 4.0 / 3.0, 5, None, auto="threshold")
    with pytest.raises(ValueError, match=f"^{re.escape(str(want.value))}$"):
        f(x, max_iter=5)
