"""torch.func on the soft operators: grad, vjp, jvp, jacrev, jacfwd, vmap and their nestings."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import topk_torch as tk  # noqa: E402

from ._oracles import mag_jacobian, mask_jacobian  # noqa: E402
from ._torch_helpers import quiet_lazy_torch_imports, separated_rows  # noqa: E402

quiet_lazy_torch_imports()

func = torch.func
SOFT = {"mask": tk.soft_topk_mask, "mag": tk.soft_topk_mag}
P_VALUES = [4.0 / 3.0, 2.0, 3.0]
P_IDS = ["p=4/3", "p=2", "p=3"]
LAM = 0.7


def _closed_form(operator, x, y, k, p):
    if operator == "mask":
        return mask_jacobian(y, LAM, p)
    return mag_jacobian(x, y, k, LAM, p)


@pytest.mark.parametrize("p", P_VALUES, ids=P_IDS)
def test_jacrev_equals_jacfwd_equals_closed_form(rng, operator, p):
    x_np = separated_rows(rng, (8,))
    x = torch.tensor(x_np)
    fn = lambda t: SOFT[operator](t, 3, p=p, regularization_strength=LAM)  # noqa: E731
    y = fn(x)
    rev, fwd = func.jacrev(fn)(x), func.jacfwd(fn)(x)
    closed = _closed_form(operator, x_np, y.numpy(), 3, p)
    assert 0 < np.count_nonzero(closed) < closed.size  # a non-trivial free set, and exact zeros
    np.testing.assert_allclose(rev.numpy(), closed, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fwd.numpy(), closed, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rev, fwd, rtol=1e-12, atol=1e-12)


def test_jacobian_of_a_batch_is_block_diagonal(rng, operator):
    x_np = separated_rows(rng, (3, 6))
    x = torch.tensor(x_np)
    fn = lambda t: SOFT[operator](t, 2, regularization_strength=LAM)  # noqa: E731
    rev = func.jacrev(fn)(x)
    fwd = func.jacfwd(fn)(x)
    torch.testing.assert_close(rev, fwd)
    y = fn(x).numpy()
    for i in range(3):
        for j in range(3):
            block = rev[i, :, j, :].numpy()
            if i == j:
                np.testing.assert_allclose(block, _closed_form(operator, x_np[i], y[i], 2, 4.0 / 3.0), atol=1e-9)
            else:
                assert not block.any()


@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0], ids=["p=4/3", "p=2"])
def test_grad_vjp_jvp(rng, operator, p):
    x = torch.tensor(separated_rows(rng, (2, 7)))
    u = torch.tensor(rng.normal(size=(2, 7)))
    fn = lambda t: SOFT[operator](t, 3, p=p, regularization_strength=LAM, axis=-1)  # noqa: E731
    jac = func.jacrev(fn)(x).reshape(14, 14)
    y, vjp_fn = func.vjp(fn, x)
    torch.testing.assert_close(y, fn(x))
    torch.testing.assert_close(vjp_fn(u)[0].reshape(-1), u.reshape(-1) @ jac)
    torch.testing.assert_close(func.grad(lambda t: (fn(t) * u).sum())(x), vjp_fn(u)[0])
    y2, y_dot = func.jvp(fn, (x,), (u,))
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(y_dot.reshape(-1), jac @ u.reshape(-1))


@pytest.mark.parametrize(("in_dim", "axis"), [(0, -1), (1, 0), (2, 1), (0, 0)])
def test_vmap_equals_loop(rng, operator, in_dim, axis):
    x = torch.tensor(rng.normal(size=(4, 5, 6)))
    fn = lambda t: SOFT[operator](t, 2, regularization_strength=LAM, axis=axis)  # noqa: E731
    got = func.vmap(fn, in_dims=in_dim, out_dims=in_dim)(x)
    expected = torch.stack([fn(t) for t in x.unbind(in_dim)], dim=in_dim)
    assert torch.equal(got, expected)


def test_nested_vmap_equals_loop(rng, operator):
    x = torch.tensor(rng.normal(size=(3, 2, 4, 5)))
    fn = lambda t: SOFT[operator](t, 2, axis=0)  # noqa: E731
    got = func.vmap(func.vmap(fn, in_dims=1), in_dims=0)(x)
    expected = torch.stack([torch.stack([fn(x[i, :, j]) for j in range(4)]) for i in range(3)])
    assert torch.equal(got, expected)


def test_per_sample_gradients(rng, operator):
    # vmap(grad): the usual per-sample-gradient pattern; grad(vmap) and jacrev(vmap) too.
    x = torch.tensor(separated_rows(rng, (5, 6)))
    w = torch.tensor(rng.normal(size=6))
    loss = lambda t: (SOFT[operator](t, 2, regularization_strength=LAM) * w).sum()  # noqa: E731
    per_sample = func.vmap(func.grad(loss))(x)
    expected = torch.stack([func.grad(loss)(row) for row in x])
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(func.grad(lambda t: func.vmap(loss)(t).sum())(x), expected)
    jac = func.jacrev(func.vmap(lambda t: SOFT[operator](t, 2, regularization_strength=LAM)))(x)
    torch.testing.assert_close(torch.stack([jac[i, :, i, :] for i in range(5)]),
                               torch.stack([func.jacrev(lambda t: SOFT[operator](t, 2, regularization_strength=LAM))(r)
                                            for r in x]))
    jac_fwd = func.vmap(func.jacfwd(lambda t: SOFT[operator](t, 2, regularization_strength=LAM)))(x)
    torch.testing.assert_close(jac_fwd, torch.stack([jac[i, :, i, :] for i in range(5)]))


def test_hessians_of_every_nesting(rng, operator):
    """p = 2: zero (locally linear).  p != 2: the nestings agree (their values against the closed forms:
    tests/test_second_order.py), except forward over forward, which raises: torch.func drops the outer
    tangent of a custom function's forward rule (it returned zeros)."""
    x = torch.tensor(separated_rows(rng, (6,)))
    w = torch.tensor(rng.normal(size=6))
    for p in (2.0, 4.0 / 3.0):
        loss = lambda t, p=p: (SOFT[operator](t, 2, p=p, regularization_strength=3.0) * w).sum()  # noqa: E731
        hessian = func.hessian(loss)(x)
        assert (torch.count_nonzero(hessian) == 0) == (p == 2.0)
        for hess in (lambda f: func.jacrev(func.jacrev(f)), lambda f: func.jacrev(func.jacfwd(f))):
            torch.testing.assert_close(hess(loss)(x), hessian)
        if p == 2.0:
            assert torch.count_nonzero(func.jacfwd(func.jacfwd(loss))(x)) == 0
        else:
            with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
                func.jacfwd(func.jacfwd(loss))(x)


@pytest.mark.parametrize("p", [4.0 / 3.0, 3.0], ids=["p=4/3", "p=3"])
def test_derivative_of_a_vjp_in_its_cotangent_is_first_order(rng, operator, p):
    """A VJP is linear in its cotangent: its derivative there is J (a JVP by "double backward"), exact
    for every p; only derivatives in x are second order.  Both raised the second-order error before."""
    x = torch.tensor(separated_rows(rng, (2, 6)))
    v = torch.tensor(rng.normal(size=(2, 6)))
    fn = lambda t: SOFT[operator](t, 2, p=p, regularization_strength=LAM)  # noqa: E731
    jv = func.jvp(fn, (x,), (v,))[1]
    jac = torch.autograd.functional.jacobian(fn, x).reshape(12, 12)
    torch.testing.assert_close(jv.reshape(12), jac @ v.reshape(12))
    torch.testing.assert_close(torch.autograd.functional.jvp(fn, x, v)[1], jv)
    _, vjp_fn = func.vjp(fn, x)
    torch.testing.assert_close(func.jvp(vjp_fn, (v,), (v,))[1][0].reshape(12), jac.T @ v.reshape(12))
    u = torch.zeros_like(x, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x.requires_grad_()), x, u, create_graph=True)
    (jtv,) = torch.autograd.grad(g, u, v)
    torch.testing.assert_close(jtv.reshape(12), jac @ v.reshape(12))


# torch.func.linearize warns so in torch 2.13 for any function (`torch.sin` too): its constant folding.
@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning")
@pytest.mark.parametrize(("method", "p"), [("pav", 4.0 / 3.0), ("threshold", 4.0 / 3.0), ("dykstra", 2.0)])
def test_linearize(rng, operator, method, p):
    """torch.func.linearize traces the JVP with make_fx: the Array-API methods failed inside their solver's
    loops (a data-dependent read of a tracing tensor); the operator is now one node of its graph."""
    x = torch.tensor(separated_rows(rng, (2, 6)))
    v = torch.tensor(rng.normal(size=(2, 6)))
    fn = lambda t: SOFT[operator](t, 2, p=p, regularization_strength=LAM, method=method)  # noqa: E731
    y, jvp_fn = func.linearize(fn, x)
    torch.testing.assert_close(y, fn(x))
    jac = torch.autograd.functional.jacobian(fn, x).reshape(12, 12)
    torch.testing.assert_close(jvp_fn(v).reshape(12), jac @ v.reshape(12))


def test_hard_operators_under_func(rng):
    x = torch.tensor(rng.normal(size=(3, 5)))
    for fn in (tk.hard_topk_mask, tk.hard_topk_mag):
        f = lambda t, fn=fn: fn(t, 2)  # noqa: E731
        assert torch.equal(func.vmap(f)(x), f(x))
        torch.testing.assert_close(func.jacrev(f)(x), func.jacfwd(f)(x))
