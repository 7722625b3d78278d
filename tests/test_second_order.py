"""Second-order derivatives of the soft operators for p != 2, in JAX and PyTorch.

For p != 2 the Jacobians move with x (through g'), so Hessians are not zero.
Every Hessian here is compared with `_oracles.weighted_output_hessian`:
central differences of the closed-form Jacobians of spec section 6 at the
outputs of an independent bisection, which share no code with the library.
(p = 2, where both operators are piecewise linear and the Hessians vanish, is
tested with each adapter.)
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from ._oracles import weighted_output_hessian

K, LAM, N = 3, 0.7, 7
P_VALUES = [1.25, 4.0 / 3.0, 1.5, 3.0]
P_IDS = ["p=5/4", "p=4/3", "p=3/2", "p=3"]


def _rows(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of N and a weight per entry (the loss is ``<w, op(x)>``)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2, N)) * 1.5, rng.normal(size=(2, N))


def _reference(op: str, x: np.ndarray, w: np.ndarray, p: float) -> np.ndarray:
    """The (2N, 2N) Hessian of ``<w, op(x)>`` over both rows: block diagonal, one oracle block per row."""
    hess = np.zeros((x.size, x.size))
    for i in range(x.shape[0]):
        block = slice(i * N, (i + 1) * N)
        hess[block, block] = weighted_output_hessian(op, x[i], w[i], K, LAM, p)
    return hess


def _assert_hessian(got, want: np.ndarray, label: str, rel: float = 1e-7) -> None:
    got = np.asarray(got, dtype=np.float64).reshape(want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * scale, err_msg=label)


# ----------------------------------------------------------------------------------------------- JAX


@pytest.fixture
def jax_ops(x64):
    jax = pytest.importorskip("jax")
    import topk_jax

    return jax, {"mask": topk_jax.soft_topk_mask, "mag": topk_jax.soft_topk_mag}


@pytest.mark.parametrize("p", P_VALUES, ids=P_IDS)
@pytest.mark.parametrize("method", ["pav", "threshold"])
def test_jax_hessian_matches_the_closed_forms(jax_ops, operator, method, p):
    jax, ops = jax_ops
    jnp = jax.numpy
    x, w = _rows(1)
    want = _reference(operator, x, w, p)
    f = functools.partial(ops[operator], k=K, regularization_strength=LAM, p=p, method=method)

    def loss(t):
        return jnp.sum(jnp.asarray(w) * f(t))

    _assert_hessian(jax.jit(jax.hessian(loss))(x), want, "hessian (forward over reverse)")
    if method == "pav":  # (the threshold method compiles for seconds per transform: one is enough)
        _assert_hessian(jax.jit(jax.jacrev(jax.jacrev(loss)))(x), want, "jacrev of jacrev")
        _assert_hessian(jax.jacfwd(jax.jacfwd(loss))(x), want, "jacfwd of jacfwd")
        v = np.random.default_rng(2).normal(size=x.shape)
        hvp = jax.grad(lambda t: jnp.vdot(jax.grad(loss)(t), jnp.asarray(v)))(x)
        _assert_hessian(hvp, want @ v.reshape(-1), "grad of grad")


@pytest.mark.parametrize("p", [4.0 / 3.0, 3.0], ids=["p=4/3", "p=3"])
def test_jax_hessian_vector_products_on_the_host_route(jax_ops, operator, p):
    """Calls of at least 2^16 entries on the CPU take the Jacobian products on the host (a primitive whose
    JVP adds the residuals' own derivative): a Hessian-vector product per row against the oracle."""
    jax, ops = jax_ops
    jnp = jax.numpy
    from topk_jax import _host_products

    rng = np.random.default_rng(3)
    batch = _host_products.HOST_PRODUCT_MIN_ENTRIES // N + 1
    x, w, v = (rng.normal(size=(batch, N)) * s for s in (1.5, 1.0, 1.0))
    loss = lambda t: jnp.sum(jnp.asarray(w) * ops[operator](t, K, regularization_strength=LAM, p=p))  # noqa: E731
    forward_over_reverse = jax.jit(lambda t: jax.jvp(jax.grad(loss), (t,), (jnp.asarray(v),))[1])(x)
    reverse_over_reverse = jax.jit(jax.grad(lambda t: jnp.vdot(jax.grad(loss)(t), jnp.asarray(v))))(x)
    for i in (0, 1, batch - 1):
        want = weighted_output_hessian(operator, x[i], w[i], K, LAM, p) @ v[i]
        _assert_hessian(forward_over_reverse[i], want, f"row {i}, forward over reverse")
        _assert_hessian(reverse_over_reverse[i], want, f"row {i}, reverse over reverse")


def test_jax_third_order_is_the_derivative_of_the_hessian(jax_ops, operator):
    """The tangent rule is made of outputs of the same rules, so any order works: the third derivative
    against central differences of the Hessian (itself checked against the oracle above)."""
    jax, ops = jax_ops
    jnp = jax.numpy
    x, w = _rows(4)
    x, w = x[0], w[0]
    loss = lambda t: jnp.sum(jnp.asarray(w) * ops[operator](t, K, regularization_strength=LAM, method="pav"))  # noqa: E731
    hessian = jax.jit(jax.hessian(loss))
    _assert_hessian(hessian(x), weighted_output_hessian(operator, x, w, K, LAM, 4.0 / 3.0), "hessian")
    third = np.asarray(jax.jit(jax.jacfwd(jax.hessian(loss)))(x))
    eps = 1e-6
    for j in range(N):
        e = np.zeros(N)
        e[j] = eps
        quotient = (np.asarray(hessian(x + e)) - np.asarray(hessian(x - e))) / (2 * eps)
        _assert_hessian(third[..., j], quotient, f"third derivative, column {j}", rel=1e-6)


def test_jax_float32_hessian(jax_ops, operator):
    jax, ops = jax_ops
    jnp = jax.numpy
    x, w = _rows(5)
    want = _reference(operator, x, w, 4.0 / 3.0)
    loss = lambda t: jnp.sum(jnp.asarray(w, jnp.float32) * ops[operator](t, K, regularization_strength=LAM))  # noqa: E731
    got = jax.jit(jax.hessian(loss))(jnp.asarray(x, jnp.float32))
    assert got.dtype == jnp.float32
    _assert_hessian(got, want, "float32", rel=1e-4)


# --------------------------------------------------------------------------------------------- torch


@pytest.fixture
def torch_ops():
    torch = pytest.importorskip("torch")
    import topk_torch

    from ._torch_helpers import quiet_lazy_torch_imports

    quiet_lazy_torch_imports()
    return torch, {"mask": topk_torch.soft_topk_mask, "mag": topk_torch.soft_topk_mag}


@pytest.mark.parametrize("p", P_VALUES, ids=P_IDS)
@pytest.mark.parametrize("method", ["pav", "threshold"])
def test_torch_hessian_matches_the_closed_forms(torch_ops, operator, method, p):
    torch, ops = torch_ops
    func = torch.func
    x, w = _rows(1)
    want = _reference(operator, x, w, p)
    wt = torch.tensor(w)
    f = functools.partial(ops[operator], k=K, regularization_strength=LAM, p=p, method=method)

    def loss(t):
        return (wt * f(t)).sum()

    xt = torch.tensor(x)
    _assert_hessian(func.hessian(loss)(xt), want, "torch.func.hessian (forward over reverse)")
    _assert_hessian(func.jacrev(func.jacrev(loss))(xt), want, "jacrev of jacrev")
    _assert_hessian(func.jacrev(func.jacfwd(loss))(xt), want, "jacrev of jacfwd")
    _assert_hessian(torch.autograd.functional.hessian(loss, xt), want, "autograd.functional.hessian")
    leaf = xt.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
    rows = [torch.autograd.grad(g, leaf, retain_graph=True)[0] for g in grad.reshape(-1)]
    _assert_hessian(torch.stack(rows), want, "create_graph=True")
    if method == "pav" and p == 4.0 / 3.0:
        # torch's own finite-difference check of the backward's backward (and forward over reverse).
        assert torch.autograd.gradgradcheck(f, (leaf,), check_fwd_over_rev=True)


def test_torch_float32_hessian(torch_ops, operator):
    torch, ops = torch_ops
    x, w = _rows(5)
    want = _reference(operator, x, w, 4.0 / 3.0)
    wt = torch.tensor(w, dtype=torch.float32)
    got = torch.func.hessian(lambda t: (wt * ops[operator](t, K, regularization_strength=LAM)).sum())(
        torch.tensor(x, dtype=torch.float32)
    )
    assert got.dtype == torch.float32
    _assert_hessian(got, want, "float32", rel=1e-4)


@pytest.mark.parametrize("p", [4.0 / 3.0, 3.0], ids=["p=4/3", "p=3"])
def test_torch_refuses_what_it_cannot_differentiate(torch_ops, operator, p):
    """Third order (the residuals' own derivatives are first order) and forward over forward (torch.func
    drops the outer tangent of a custom function's forward rule: it returned zeros) raise, never a
    silently wrong value; first and second order keep working after."""
    torch, ops = torch_ops
    func = torch.func
    x, w = _rows(6)
    xt, wt = torch.tensor(x), torch.tensor(w)
    loss = lambda t: (wt * ops[operator](t, K, regularization_strength=LAM, p=p)).sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="order three and higher"):
        func.jacrev(func.hessian(loss))(xt)
    leaf = xt.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), leaf, create_graph=True)
    with pytest.raises(NotImplementedError, match="order three and higher"):
        torch.autograd.grad(second.sum(), leaf)
    for nested in (func.jacfwd(func.jacfwd(loss)), lambda t: func.jvp(lambda s: func.jvp(loss, (s,), (t,))[1],
                                                                        (t,), (t,))[1]):
        with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
            nested(xt)
    _assert_hessian(func.hessian(loss)(xt), _reference(operator, x, w, p), "hessian after the refusals")


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph-breaks"])
def test_torch_hessian_inside_compile(torch_ops, operator, fullgraph):
    """`torch.compile` of torch.func transforms takes the linearized route (g' moved half a step): exact
    Hessians; a third derivative and forward over forward raise (the latter crashed the process when
    compiled on torch 2.13, even for ``x ** 3``)."""
    from topk_torch._support import torch_release

    from ._torch_helpers import compile_skip_reason

    if (reason := compile_skip_reason()) is not None:
        pytest.skip(reason)
    torch, ops = torch_ops
    func = torch.func
    x, w = _rows(7)
    xt, wt = torch.tensor(x), torch.tensor(w)
    loss = lambda t: (wt * ops[operator](t, K, regularization_strength=LAM)).sum()  # noqa: E731
    want = _reference(operator, x, w, 4.0 / 3.0)
    for name, transform in (("hessian", func.hessian), ("jacrev of jacrev", lambda f: func.jacrev(func.jacrev(f)))):
        torch._dynamo.reset()
        _assert_hessian(torch.compile(transform(loss), fullgraph=fullgraph, backend="aot_eager")(xt), want, name)
    for name, transform, match in (
        ("third", lambda f: func.jacrev(func.hessian(f)), "order three and higher"),
        ("forward over forward", lambda f: func.jacfwd(func.jacfwd(f)), "forward mode over forward mode"),
    ):
        torch._dynamo.reset()
        with pytest.raises(Exception) as info:  # (Dynamo wraps it under fullgraph)
            torch.compile(transform(loss), fullgraph=fullgraph, backend="aot_eager")(xt)
        message = f"{info.value} {info.value.__cause__}"
        if fullgraph and torch_release(torch.__version__) < (2, 9):
            # torch 2.8's Dynamo replaces the refusal's message under fullgraph (docs/torch.md).
            assert match in message or "Observed exception" in message, name
        else:
            assert match in message, name
    torch._dynamo.reset()


def test_hessians_of_a_batch_by_vmap(jax_ops, torch_ops, operator):
    """`vmap` of `hessian`: the same blocks as the oracle's, in both frameworks (JAX batches the residuals'
    rule, torch `_MovingGprime`'s generated vmap rule)."""
    jax, jax_ops_ = jax_ops
    torch, torch_ops_ = torch_ops
    jnp = jax.numpy
    x, w = _rows(8)
    want = np.stack([weighted_output_hessian(operator, x[i], w[i], K, LAM, 4.0 / 3.0) for i in range(2)])
    jax_loss = lambda t, c: jnp.sum(c * jax_ops_[operator](t, K, regularization_strength=LAM))  # noqa: E731
    _assert_hessian(jax.jit(jax.vmap(jax.hessian(jax_loss)))(x, w), want, "jax.vmap(jax.hessian)")
    torch_loss = lambda t, c: (c * torch_ops_[operator](t, K, regularization_strength=LAM)).sum()  # noqa: E731
    got = torch.func.vmap(torch.func.hessian(torch_loss))(torch.tensor(x), torch.tensor(w))
    _assert_hessian(got, want, "torch.func.vmap(torch.func.hessian)")
