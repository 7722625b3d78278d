"""topk_jax: the host route's Jacobian products as a primitive (`topk_jax._host_products`) in every transform.

The primitive serves calls of at least `HOST_PRODUCT_MIN_ENTRIES` entries; here that limit is lowered to 0
so that small arrays take it, and every derivative is compared with the `jax.numpy` product (the limit
raised beyond the arrays) and with independent references: the NumPy adapter's VJP and the closed-form
Jacobians of `tests/_oracles.py`.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import topk_numpy as tn  # noqa: E402
from topk_jax import _host_products  # noqa: E402

from ._jax_helpers import rows, soft  # noqa: E402
from ._oracles import mag_jacobian, mask_jacobian  # noqa: E402

OPS = ["mask", "mag"]


@pytest.fixture
def host(monkeypatch):
    """Every call takes the primitive; counts the products it runs on the host."""
    calls = []
    real = _host_products._product_on_host

    def counted(kind, transpose, *arrays, **into):
        calls.append((kind, transpose))
        return real(kind, transpose, *arrays, **into)

    monkeypatch.setattr(_host_products, "HOST_PRODUCT_MIN_ENTRIES", 0)
    monkeypatch.setattr(_host_products, "_product_on_host", counted)
    return calls


def _xla(monkeypatch):
    monkeypatch.setattr(_host_products, "HOST_PRODUCT_MIN_ENTRIES", 1 << 62)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0], ids=["p=4/3", "p=2"])
def test_grad_is_the_numpy_vjp(host, op, p):
    x = rows(30, (5, 9)).astype(np.float32)
    u = np.random.default_rng(31).normal(size=(5, 9)).astype(np.float32)
    f = partial(soft(op), k=3, p=p)
    got = jax.jit(jax.grad(lambda t: jnp.vdot(f(t), u)))(jnp.asarray(x))
    _, vjp = getattr(tn, f"soft_topk_{op}_vjp")(x, 3, p=p)
    np.testing.assert_array_equal(np.asarray(got), vjp(u))  # the same Numba product, bit for bit
    assert (op, True) in host


@pytest.mark.parametrize("op", OPS)
def test_jacobians_match_the_closed_form(host, x64, op):
    x = jnp.asarray(np.random.default_rng(14).normal(size=9) * 1.5)
    lam, k, p = 0.7, 3, 4.0 / 3.0
    f = partial(soft(op), k=k, p=p, regularization_strength=lam)
    y = np.asarray(f(x))
    closed = mask_jacobian(y, lam, p) if op == "mask" else mag_jacobian(np.asarray(x), y, k, lam, p)
    for transform in (jax.jacfwd, jax.jacrev):
        np.testing.assert_allclose(np.asarray(jax.jit(transform(f))(x)), closed, rtol=1e-9, atol=1e-10)
    assert {(op, False), (op, True)} <= set(host)


@pytest.mark.parametrize("op", OPS)
def test_check_grads(host, x64, op):
    x = jnp.asarray(rows(33, (3, 7)))
    check_grads(partial(soft(op), k=2, p=4.0 / 3.0, regularization_strength=0.9), (x,), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("op", OPS)
def test_vmap_of_grad_is_one_batched_product(host, op):
    x = jnp.asarray(rows(34, (4, 3, 6)).astype(np.float32))
    f = partial(soft(op), k=2)
    per_slice = jax.vmap(jax.grad(lambda t: jnp.sum(f(t) ** 2)))
    got = jax.jit(per_slice)(x)
    want = np.stack([np.asarray(jax.grad(lambda t: jnp.sum(f(t) ** 2))(s)) for s in x])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", OPS)
def test_second_order_p2_is_exact(host, x64, op):
    x = jnp.asarray(rows(35, (7,)))
    w = jnp.linspace(-1.0, 2.0, 7)
    f = partial(soft(op), k=3, p=2.0, regularization_strength=0.8)

    def loss(t):
        return jnp.sum(f(t) ** 2)

    jac = np.asarray(jax.jit(jax.jacfwd(f))(x))
    hess = np.asarray(jax.jit(jax.hessian(loss))(x))
    np.testing.assert_allclose(hess, 2.0 * jac.T @ jac, rtol=0, atol=1e-12)
    hvp = jax.jit(jax.grad(lambda t: jnp.vdot(jax.grad(loss)(t), w)))(x)
    np.testing.assert_allclose(np.asarray(hvp), hess @ np.asarray(w), rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_the_size_limit_picks_the_product(monkeypatch, op):
    x = jnp.asarray(rows(37, (6, 9)).astype(np.float32))
    f = jax.jit(jax.grad(lambda t: jnp.sum(soft(op)(t, 3) ** 2)))
    calls = []
    real = _host_products._product_on_host
    monkeypatch.setattr(_host_products, "_product_on_host", lambda *a, **kw: calls.append(a[:2]) or real(*a, **kw))
    _xla(monkeypatch)
    small = f(x)
    assert not calls  # below the limit: the jax.numpy product
    monkeypatch.setattr(_host_products, "HOST_PRODUCT_MIN_ENTRIES", x.size)
    large = jax.jit(jax.grad(lambda t: jnp.sum(soft(op)(t, 3) ** 2)))(x)
    assert calls
    np.testing.assert_allclose(np.asarray(large), np.asarray(small), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", OPS)
def test_threshold_method_residuals_take_it_too(host, monkeypatch, op):
    # The threshold method's residuals are in input order too (computed by the jax.numpy loop, on the CPU).
    x = jnp.asarray(rows(38, (4, 8)).astype(np.float32))

    def grad():
        return np.asarray(jax.jit(jax.grad(lambda t: jnp.sum(soft(op)(t, 3, method="threshold") ** 2)))(x))

    got = grad()
    assert (op, True) in host
    _xla(monkeypatch)
    np.testing.assert_allclose(got, grad(), rtol=1e-6, atol=1e-6)
