"""PyTorch: a plain backward on CPU tensors runs the core's Numba product; every other backward
(recorded with ``create_graph``, under `torch.func`, traced by `torch.compile`) stays in torch.

Both routes evaluate the same closed form; here they must agree, and the route must be the
one the rule says.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import topk_torch as tt  # noqa: E402
from topk_torch import _products  # noqa: E402

from ._torch_helpers import requires_compile  # noqa: E402


@pytest.fixture
def routes(monkeypatch):
    """Records, for every VJP, whether it left torch."""
    taken = []
    original = _products._plain_host_rows

    def spy(res, cotangent):
        host = original(res, cotangent)
        taken.append(host)
        return host

    monkeypatch.setattr(_products, "_plain_host_rows", spy)
    return taken


def _grad(op, x, k, u, **kw):
    xx = x.clone().requires_grad_(True)
    (op(xx, k, **kw) * u).sum().backward()
    return xx.grad


@pytest.mark.parametrize("method", ["pav", "threshold"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_backward_takes_the_host_product_and_matches_torch(routes, monkeypatch, operator, p, method, dtype):
    op = tt.soft_topk_mask if operator == "mask" else tt.soft_topk_mag
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 9, generator=gen, dtype=dtype)
    u = torch.randn(33, 9, generator=gen, dtype=dtype)
    kw = dict(regularization_strength=0.3, p=p, method=method)
    host = _grad(op, x, 3, u, **kw)
    assert routes == [True]
    monkeypatch.setattr(_products, "_plain_host_rows", lambda *a: False)
    in_torch = _grad(op, x, 3, u, **kw)
    assert host.dtype == dtype and host.device.type == "cpu"
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(host, in_torch, rtol=100 * eps, atol=100 * eps * float(in_torch.abs().max()))


def test_non_contiguous_and_negated_cotangents(routes):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 20, generator=gen, dtype=torch.float64)
    u = torch.randn(20, 6, generator=gen, dtype=torch.float64).T  # a transposed view
    xx = x.clone().requires_grad_(True)
    tt.soft_topk_mask(xx, 4, regularization_strength=0.5).backward(-u)  # a lazily negated view
    assert routes and all(routes)
    expected = _grad(tt.soft_topk_mask, x, 4, -u.contiguous(), regularization_strength=0.5)
    torch.testing.assert_close(xx.grad, expected)


def test_recorded_and_transformed_backwards_stay_in_torch(routes):
    x = torch.randn(4, 7, dtype=torch.float64)
    # create_graph=True records the backward (second derivatives, p = 2): torch ops only.
    xx = x.clone().requires_grad_(True)
    torch.autograd.grad(tt.soft_topk_mask(xx, 2, p=2.0).pow(2).sum(), xx, create_graph=True)
    assert routes == [False]
    # torch.func transforms wrap their tensors.
    routes.clear()
    torch.func.grad(lambda a: tt.soft_topk_mask(a, 2).pow(2).sum())(x)
    assert routes == [False]
    routes.clear()
    torch.func.vmap(torch.func.grad(lambda a: tt.soft_topk_mag(a, 2).sum()))(x)
    assert routes and not any(routes)


@requires_compile()
def test_compiled_backward_stays_in_torch(routes):
    # AOTAutograd traces the backward with fake tensors; the compiled graph never calls back.
    x = torch.randn(5, 8, dtype=torch.float64)
    u = torch.randn(5, 8, dtype=torch.float64)
    torch._dynamo.reset()
    f = torch.compile(lambda a: (tt.soft_topk_mag(a, 3) * u).sum(), fullgraph=True, backend="aot_eager")
    xx = x.clone().requires_grad_(True)
    f(xx).backward()
    assert routes and not any(routes)  # traced once, with fake tensors
    torch.testing.assert_close(xx.grad, _grad(tt.soft_topk_mag, x, 3, u))


def test_expanded_cotangent_of_a_sum(routes, monkeypatch):
    # y.sum().backward() hands the backward a cotangent expanded from one element (stride 0).
    x = torch.randn(5, 7, dtype=torch.float64)
    host = x.clone().requires_grad_(True)
    tt.soft_topk_mag(host, 3).sum().backward()
    assert routes == [True]
    monkeypatch.setattr(_products, "_plain_host_rows", lambda *a: False)
    in_torch = x.clone().requires_grad_(True)
    tt.soft_topk_mag(in_torch, 3).sum().backward()
    torch.testing.assert_close(host.grad, in_torch.grad)
