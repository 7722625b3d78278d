"""torch.compile(fullgraph=True) of a function that calls every operator, forward and backward.

Compilation is slow, so one function covers all four operators (two axes,
both exponents, both operator families) and is compiled once with gradients
and once without.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import topk_torch as tk  # noqa: E402

from ._subprocess import run_python  # noqa: E402
from ._torch_helpers import quiet_lazy_torch_imports, requires_compile  # noqa: E402

pytestmark = requires_compile()

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


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph-breaks"])
def test_second_order_torch_func_inside_compile(fullgraph):
    """`torch.compile(torch.func.hessian(loss))` (and grad of grad) equal eager mode for every p: the
    linearized route moves g' half a step (until 2026-12-07 it returned zeros for p != 2, then raised).
    Against the closed forms and for third order: tests/test_second_order.py."""
    x = torch.tensor([2.0, -1.1, 0.3, 1.4, -0.6], dtype=torch.float64)
    w = torch.arange(1.0, 6.0, dtype=torch.float64)
    for p in (4.0 / 3.0, 2.0):
        def loss(t, p=p):
            return ((tk.soft_topk_mask(t, 2, p=p) * w) ** 2).sum()

        nested = {"hessian": torch.func.hessian(loss),
                  "grad of grad": torch.func.grad(lambda t, loss=loss: torch.func.grad(loss)(t).sum()),
                  "grad": torch.func.grad(loss)}
        for name, fn in nested.items():
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=fullgraph, backend="aot_eager")
            torch.testing.assert_close(compiled(x), fn(x), msg=f"{name}, p = {p}")
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["pav", "threshold", "dykstra"])
def test_torch_func_inside_compile_on_non_finite_rows(method):
    """The linearized route gave infinite entries a zero derivative where eager mode gives the magnitude's
    identity (it returns them as they are), and the NaN entry of a NaN row 0 where eager mode gives NaN."""
    torch._dynamo.reset()
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[0.3, -inf, 0.2, 0.1, 0.0], [nan, 1.0, 2.0, 3.0, 4.0], [inf, -inf, inf, 1.0, 2.0],
                      [inf, 0.5, -inf, 1.0, 2.0], [0.3, -0.1, 0.2, 0.1, 0.0]], dtype=torch.float64)
    u = torch.arange(1.0, 6.0, dtype=torch.float64).expand(5, 5)
    p = 2.0 if method == "dykstra" else 4.0 / 3.0
    for op in (tk.soft_topk_mask, tk.soft_topk_mag):
        def f(t, op=op):
            return op(t, 2, regularization_strength=1.0, p=p, method=method)

        for fn in (lambda t: torch.func.vjp(f, t)[1](u)[0], lambda t: torch.func.jvp(f, (t,), (u,))[1]):
            expected = fn(x)
            got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
            torch.testing.assert_close(got, expected, equal_nan=True, rtol=1e-12, atol=1e-12)
        assert torch.isnan(torch.func.vjp(f, x)[1](u)[0][1]).all()
    torch._dynamo.reset()


@pytest.mark.parametrize(("method", "p"), [("pav", 4.0 / 3.0), ("threshold", 4.0 / 3.0), ("dykstra", 2.0)])
def test_make_fx_and_export_record_the_operator(method, p):
    """make_fx (every tracing mode) and torch.export record the custom operator as one node: they traced into
    the implementation before, which reads its data (the Array-API methods' loops; PAV's host arrays)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.tensor([[0.3, -0.1, 0.25, 0.05, -0.4], [1.0, 2.0, -3.0, 0.5, 0.0]], dtype=torch.float64)

    def f(t):
        return tk.soft_topk_mag(t, 2, regularization_strength=0.5, p=p, method=method)

    for mode in ("real", "fake", "symbolic"):
        graph = make_fx(f, tracing_mode=mode)(x)
        ops = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
        assert any(op.startswith("sparse_topk.") for op in ops), (mode, ops)
        torch.testing.assert_close(graph(x), f(x))

    class Module(torch.nn.Module):
        def forward(self, t):
            return tk.soft_topk_mask(t, 2, regularization_strength=0.5, p=p, method=method)

    exported = torch.export.export(Module(), (x,))
    torch.testing.assert_close(exported.module()(x), Module()(x))


@pytest.mark.parametrize("method", ["pav", "threshold"])
def test_fullgraph_after_torch_func_of_a_compiled_function(method):
    """`torch.func.grad(torch.compile(loss))` runs the transform eagerly and Dynamo compiles the frames it
    enters, the operator's `autograd.Function.forward` among them; a later `torch.compile(loss,
    fullgraph=True)` traced into that forward and failed (the solver's host arrays, then the dispatch-mode
    probe).  The forward now calls the custom operator whenever Dynamo traces it."""
    torch._dynamo.reset()
    x = torch.tensor([[0.3, -0.1, 0.25, 0.05, -0.4]], dtype=torch.float64)

    def loss(t):
        return (tk.soft_topk_mask(t, 2, regularization_strength=0.5, method=method) ** 2).sum()

    expected = torch.func.grad(loss)(x)
    torch.testing.assert_close(torch.func.grad(torch.compile(loss, backend="aot_eager"))(x), expected)
    leaf = x.clone().requires_grad_()
    value = torch.compile(loss, fullgraph=True, backend="aot_eager")(leaf)
    torch.testing.assert_close(value, loss(x))
    value.backward()
    torch.testing.assert_close(leaf.grad, expected)
    torch._dynamo.reset()


@pytest.mark.parametrize(("method", "p"), [("pav", 8.0), ("threshold", 12.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_torch_func_inside_compile_keeps_the_dominant_entry_exact(method, p, dtype):
    """The linearized route's reverse mode is autograd's transpose of the core's JVP, whose dominant-entry
    form computed a term that is 0 and whose transpose is two terms of order g' that cancel (p = 8, PAV,
    float64: VJPs 0.9 times a row's largest entry off).  Against NumPy's VJP in float64."""
    import numpy as np

    import topk_numpy as tn

    gen = np.random.default_rng(5)
    x = gen.normal(size=(400, 4))
    u = gen.normal(size=x.shape)
    for op in ("mask", "mag"):
        # Compiled afresh: torch 2.9.1's Dynamo ran the mask's graph again for the magnitude's lambda
        # (the same code with another default `f`), whatever the function (torch.sin, then torch.cos).
        torch._dynamo.reset()

        def f(t, op=op):
            return getattr(tk, f"soft_topk_{op}")(t, 2, regularization_strength=0.1, p=p, method=method)

        vjp = torch.compile(lambda t, c, f=f: torch.func.vjp(f, t)[1](c)[0], fullgraph=True, backend="aot_eager")
        got = vjp(torch.tensor(x, dtype=dtype), torch.tensor(u, dtype=dtype)).double().numpy()
        xr = torch.tensor(x, dtype=dtype).double().numpy()  # the rounded input
        _, want_fn = getattr(tn, f"soft_topk_{op}_vjp")(xr, 2, regularization_strength=0.1, p=p, method=method)
        want = want_fn(torch.tensor(u, dtype=dtype).double().numpy())
        scale = np.maximum(1.0, np.abs(want).max(axis=1, keepdims=True))
        assert (np.abs(got - want) / scale).max() < (1e-5 if dtype == torch.float32 else 1e-12), op
    torch._dynamo.reset()


# --- the magnitude's compiled backward on the CPU: the Numba product as an opaque operator ---------------


@pytest.fixture
def uncached():
    """Each compilation traced afresh (no compiled graph from an earlier trace of the same function)."""
    import torch._functorch.config
    import torch._inductor.config

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def _counting_products(monkeypatch):
    import topk_core

    calls = []
    for name in ("mag_vjp_from_residuals", "mag_jvp_from_residuals"):
        real = getattr(topk_core, name)

        def counted(res, rows, *args, real=real, name=name, **kw):
            calls.append((name, type(rows).__module__.split(".")[0]))
            return real(res, rows, *args, **kw)

        monkeypatch.setattr(topk_core, name, counted)
    return calls


@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0], ids=["p=4/3", "p=2"])
@pytest.mark.parametrize("method", ["pav", "threshold"])
def test_compiled_magnitude_backward_is_the_numba_product(uncached, monkeypatch, p, method):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 12, generator=gen)
    u = torch.randn(40, 12, generator=gen)

    def f(t):
        return tk.soft_topk_mag(t, 3, p=p, method=method)

    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    (want,) = torch.autograd.grad(f(xe), xe, u)
    calls = _counting_products(monkeypatch)
    (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True)(xc), xc, u)
    # The host operator ran the core's VJP on NumPy arrays: the eager backward's numbers, bit for bit.
    assert ("mag_vjp_from_residuals", "numpy") in calls
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _xp_torch():
    from topk_torch._namespace import xp

    return xp


def test_host_product_operator_passes_opcheck():
    import topk_core
    from topk_torch import _host_products

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    _, *res = torch.ops.sparse_topk.soft_topk_mag_pav(x, 2, torch.tensor(0.5, dtype=torch.float64), 2.0)
    gprime, codes, offset = res[4], res[5], res[6]
    rows = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    for transpose in (True, False):
        torch.library.opcheck(_host_products.mag_product_host, (gprime, codes, offset, rows, transpose))
        # Its derivative in the rows is the product the other way (the residuals are constants).
        assert torch.autograd.gradcheck(
            lambda t, transpose=transpose: _host_products.mag_product_host(gprime, codes, offset, t, transpose),
            (rows,),
        )
        want = topk_core.mag_vjp_from_residuals if transpose else topk_core.mag_jvp_from_residuals
        core_res = topk_core.MagResiduals(None, None, None, None, gprime, codes, offset)
        torch.testing.assert_close(_host_products.mag_product_host(gprime, codes, offset, rows.detach(), transpose),
                                   want(core_res, rows.detach(), axis=-1, xp=_xp_torch()))


@pytest.mark.parametrize("method", ["pav", "threshold"])
def test_an_annealed_strength_compiles_once(method):
    # A strength that changes at every step (an annealing schedule, docs/choosing.md).  Dynamo makes a
    # float that changed symbolic: `math.isfinite` in the argument check could not take it (the second
    # value failed to compile), and the operators' float argument specialized it (every value compiled
    # again, and the 9th failed hard at Dynamo's recompile limit under fullgraph=True).
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    fn = torch.compile(lambda x, lam: tk.soft_topk_mask(x, 2, regularization_strength=lam, method=method),
                       fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for step in range(12):
        lam = 0.5 * 0.9**step
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = fn(xc, lam)
        want = tk.soft_topk_mask(xe, 2, regularization_strength=lam, method=method)
        (got * x).sum().backward()
        (want * x).sum().backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(xc.grad, xe.grad)
    assert counters["stats"]["unique_graphs"] <= 2  # the first value static, then one symbolic graph
    torch._dynamo.reset()


def test_a_compiled_first_call_of_the_array_api_family_with_gradients():
    # In a fresh process, the first call of "threshold" compiled with gradients read its residual layout
    # (`topk_torch._ops.layout`) from a probe that ran with fake tensors, and failed ("Could not guard on
    # data-dependent expression").
    out = run_python(
        "import torch, topk_torch as tk\n"
        "f = torch.compile(lambda x: tk.soft_topk_mag(x, 2, method='threshold'), fullgraph=True, backend='aot_eager')\n"
        "x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)\n"
        "(f(x) * x).sum().backward()\n"
        "xe = x.detach().clone().requires_grad_()\n"
        "(tk.soft_topk_mag(xe, 2, method='pav') * xe).sum().backward()\n"
        "print(torch.allclose(x.grad, xe.grad, atol=1e-10))\n"
    )
    assert out.strip() == "True"
