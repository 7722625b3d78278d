"""torch.compile(fullgraph=True) of a function that calls every operator, forward and backward.

Compilation is slow, so one function covers all four operators (two axes,
both exponents, both operator families) and is compiled once with gradients
and once without.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import topk_torch as tk  # noqa: E402

from ._torch_helpers import quiet_lazy_torch_imports  # noqa: E402

quiet_lazy_torch_imports()


def _every_operator(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    a = tk.soft_topk_mask(x, 3)
    b = tk.soft_topk_mag(x, 2, p=2.0, regularization_strength=0.5, axis=0)
    c = tk.hard_topk_mask(x, 2)
    d = tk.hard_topk_mag(x, 2, axis=0)
    e = tk.soft_topk_mag(x, 2, regularization_strength=0.5, method="threshold")  # the Array-API family
    return (a * w).sum() + (b * w.flip(0)).sum() + (c * x).sum() + (d**2).sum() + (e * w).sum()


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    yield torch.compile(_every_operator, fullgraph=True)
    torch._dynamo.reset()


def test_compiled_forward_and_backward_equal_eager(compiled):
    gen = torch.Generator().manual_seed(0)
    for shape in ((5, 8), (6, 9)):  # the second shape exercises a recompilation
        x = torch.randn(shape, generator=gen)
        w = torch.randn(shape, generator=gen)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager, got = _every_operator(xe, w), compiled(xc, w)
        eager.backward()
        got.backward()
        torch.testing.assert_close(got, eager)
        torch.testing.assert_close(xc.grad, xe.grad)


def test_compiled_without_grad_equals_eager(compiled):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    w = torch.ones(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, w), _every_operator(x, w))


@pytest.mark.parametrize("transform", ["grad", "jvp", "jacrev", "vmap"])
def test_torch_func_inside_compile(transform):
    # torch.func inside torch.compile takes the linearized route (plain torch operations around
    # the custom operator); aot_eager keeps the test fast, Dynamo and AOTAutograd are the same.
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 6, generator=gen, dtype=torch.float64)

    def f(t):
        return tk.soft_topk_mask(t, 2, regularization_strength=2.0) + tk.soft_topk_mag(t, 2, regularization_strength=2.0)

    fn = {
        "grad": lambda x: torch.func.grad(lambda t: (f(t) * w).sum())(x),
        "jvp": lambda x: torch.func.jvp(f, (x,), (w,))[1],
        "jacrev": lambda x: torch.func.jacrev(f)(x[0]),
        "vmap": lambda x: torch.func.vmap(f)(x),
    }[transform]
    expected = fn(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), expected)
    torch._dynamo.reset()
