"""The PyTorch adapter's compiled solver loop (`topk_torch._fused`).

On CUDA tensors the threshold and Dykstra methods run the core's loop with
its body under `torch.compile`; ``SPARSE_TOPK_TORCH_COMPILE=always`` does the
same on the CPU, which is how these tests reach it. Most of them compile with
Dynamo alone (backend ``"eager"``: the tracing, guards and graph reuse of the
real path, in seconds); one compiles with inductor. The reference is PAV (an
independent exact solver) in float64, and the eager loop.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import topk_torch as tk  # noqa: E402
from topk_torch import _fused  # noqa: E402

from ._torch_helpers import quiet_lazy_torch_imports, requires_compile  # noqa: E402

pytestmark = requires_compile()

quiet_lazy_torch_imports()

CASES = [("mask", "threshold", 4 / 3), ("mask", "threshold", 2.0), ("mask", "dykstra", 2.0),
         ("mag", "threshold", 4 / 3), ("mag", "threshold", 2.0), ("mag", "dykstra", 2.0)]


@pytest.fixture
def compiled_loops(monkeypatch):
    """Loops and stages compiled on the CPU by Dynamo alone; counts the compiled loops and stages run."""
    monkeypatch.setenv(_fused.ENVIRONMENT_VARIABLE, "always")
    monkeypatch.setattr(_fused, "BACKEND", "eager")
    monkeypatch.setattr(_fused, "_failures", [])
    calls = []
    for name in ("compiled_loop", "compiled_stage"):
        original = getattr(_fused, name)

        def counted(*args, original=original, name=name, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(_fused, name, counted)
    return calls


def _rows(shape=(6, 9), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype)


def _value_and_grad(op, x, u, **kw):
    xr = x.detach().requires_grad_()
    y = getattr(tk, f"soft_topk_{op}")(xr, 3, **kw)
    (grad,) = torch.autograd.grad(y, xr, u)
    return y.detach(), grad


@pytest.mark.parametrize(("mode", "device", "compiled"), [
    (None, "cpu", False), ("auto", "cpu", False), ("AUTO", "cpu", False), ("never", "cpu", False),
    ("always", "cpu", True), ("", "cpu", False), ("auto", "meta", False), ("never", "meta", False),
])
def test_the_environment_variable_picks_the_loop(monkeypatch, mode, device, compiled):
    if mode is None:
        monkeypatch.delenv(_fused.ENVIRONMENT_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(_fused.ENVIRONMENT_VARIABLE, mode)
    monkeypatch.setattr(_fused, "_failures", [])
    hooks = _fused.solver_hooks(torch.zeros(2, 3, device=device), "threshold")
    assert (hooks.get("loop") is _fused.compiled_loop) is compiled and ("stage" in hooks) is compiled
    # The threshold method's start comes from torch.topk either way; Dykstra takes no order statistics.
    assert hooks["order_statistics"] is _fused.order_statistics
    assert "order_statistics" not in _fused.solver_hooks(torch.zeros(2, 3, device=device), "dykstra")


def test_cuda_tensors_get_the_compiled_loop_by_default(monkeypatch):
    """The default rule, without a GPU: a tensor whose device type is cuda (a stand-in object)."""
    monkeypatch.delenv(_fused.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(_fused, "_failures", [])

    class OnCuda:
        device = torch.device("cuda", 0)

    assert _fused.use_compiled(OnCuda())
    monkeypatch.setenv(_fused.ENVIRONMENT_VARIABLE, "never")
    assert not _fused.use_compiled(OnCuda())


def test_a_wrong_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(_fused.ENVIRONMENT_VARIABLE, "yes")
    with pytest.raises(ValueError, match="SPARSE_TOPK_TORCH_COMPILE must be one of"):
        tk.soft_topk_mask(torch.zeros(2, 3), 1, method="threshold")


@pytest.mark.parametrize(("op", "method", "p"), CASES)
def test_compiled_loop_matches_pav_and_the_eager_loop(compiled_loops, monkeypatch, op, method, p):
    x, u = _rows()
    x[1, 2] = x[1, 5]  # a tie
    x[2] = 0.0  # a row of zeros
    got = _value_and_grad(op, x, u, p=p, method=method)
    # The loop; the threshold method's stages; the backward's product (Dykstra's too: its residuals
    # are in sorted order, which the host's product does not take).
    assert "compiled_loop" in compiled_loops and "compiled_stage" in compiled_loops
    want = _value_and_grad(op, x, u, p=p, method="pav")
    tol = 1e-10 if method == "threshold" else 1e-6  # Dykstra: approximate, its default tolerance
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=tol)
    monkeypatch.setenv(_fused.ENVIRONMENT_VARIABLE, "never")
    calls = len(compiled_loops)
    eager = _value_and_grad(op, x, u, p=p, method=method)
    assert len(compiled_loops) == calls
    for a, b in zip(got, eager, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [4 / 3, 2.0, 3.0])
def test_compiled_loop_frames_rows_far_below_their_largest_key_again(compiled_loops, p):
    # The magnitude's rows whose k-th place lies among keys hundreds of orders below the largest are
    # framed again in a loop of their own (`topk_core._agnostic.threshold._mag_deep_frames`), compiled
    # here like the root finder's; with an ordinary row in the batch.
    x = torch.tensor([[1e250, 1e-250, 3e-251, -2e-251, 5e-251, 0.0],
                      [1e300, -1e100, 5e-10, 1e-300, 2e-301, -3e-301],
                      [0.3, -1.2, 0.8, 2.0, -0.1, 0.5]], dtype=torch.float64)
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # (Without the frames' rounds, `threshold._DEEP_ROUNDS = 0`, the first two rows fail.)
    got = _value_and_grad("mag", x, u, p=p, method="threshold", regularization_strength=1.0)
    assert "compiled_loop" in compiled_loops
    want = _value_and_grad("mag", x, u, p=p, method="pav", regularization_strength=1.0)
    bad = (got[0] - want[0]).abs() > 1e-12 * x.abs()
    assert not bad.any(), (got[0][bad], want[0][bad])
    np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("unroll", [2, 4])
@pytest.mark.parametrize(("op", "method", "p", "max_iter"), [
    ("mask", "threshold", 4 / 3, None), ("mag", "threshold", 2.0, None), ("mask", "threshold", 4 / 3, 3),
    ("mag", "dykstra", 2.0, None),  # Dykstra's loop is never unrolled (its tracing time explodes)
])
def test_unrolled_loop_is_the_loop(compiled_loops, monkeypatch, unroll, op, method, p, max_iter):
    """Several iterations per compiled call, each guarded by the loop's test: the same numbers as
    one iteration per call and as the eager loop, iteration cap included."""
    x, u = _rows(seed=7)
    kw = {"p": p, "method": method, "max_iter": max_iter}
    if max_iter is not None:
        kw["tol"] = 1e-30  # a cap that binds
    got = {}
    for times in (1, unroll):
        monkeypatch.setattr(_fused, "UNROLL", times)
        got[times] = _value_and_grad(op, x, u, **kw)
    monkeypatch.setenv(_fused.ENVIRONMENT_VARIABLE, "never")
    eager = _value_and_grad(op, x, u, **kw)
    for a, b, c in zip(got[unroll], got[1], eager, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_one_graph_serves_other_batch_sizes(compiled_loops):
    """`dynamic=True`: a new batch size reuses the traced loop body (no new graph per shape)."""
    counts = torch._dynamo.utils.counters
    for batch in (5, 7, 11, 13):
        x, u = _rows((batch, 9), seed=batch)
        got = _value_and_grad("mask", x, u, p=2.0, method="threshold")
        want = _value_and_grad("mask", x, u, p=2.0, method="pav")
        np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=0, atol=1e-10)
        if batch == 7:
            traced = counts["stats"]["unique_graphs"]
    assert counts["stats"]["unique_graphs"] == traced


@pytest.mark.parametrize(("op", "method", "p"), [("mask", "threshold", 4 / 3), ("mag", "threshold", 2.0),
                                                  ("mag", "dykstra", 2.0)])
def test_plain_device_backward_is_one_compiled_product(compiled_loops, monkeypatch, op, method, p):
    """On a device (here: the CPU with its host product turned off) a plain backward is compiled;
    one that is recorded (create_graph, for second derivatives) stays eager and differentiable."""
    from topk_torch import _products

    monkeypatch.setattr(_products, "_plain_host_rows", lambda *a: False)
    x, u = _rows(seed=6)
    got = _value_and_grad(op, x, u, p=p, method=method)
    assert compiled_loops.count("compiled_stage") >= 1
    products = [name for name in compiled_loops if name == "compiled_stage"]
    want = _value_and_grad(op, x, u, p=p, method="pav")
    np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=0, atol=1e-10 if method == "threshold" else 1e-6)
    calls = []
    original = _products._COMPILED_VJP[op]
    monkeypatch.setitem(_products._COMPILED_VJP, op, lambda *a: calls.append(1) or original(*a))
    _value_and_grad(op, x, u, p=p, method=method)
    assert calls == [1]
    if p == 2.0:  # recorded backward: eager (a compiled function has no double backward)
        xr = x.detach().requires_grad_()
        (grad,) = torch.autograd.grad(getattr(tk, f"soft_topk_{op}")(xr, 3, p=p, method=method), xr, u,
                                      create_graph=True)
        assert calls == [1]
        np.testing.assert_allclose(grad.detach().numpy(), want[1].numpy(), rtol=0, atol=1e-6)
    assert products


def test_other_strengths_and_k_reuse_the_graphs(compiled_loops):
    """Dynamic scalars: a strength annealed during training must not compile every step."""
    counts = torch._dynamo.utils.counters
    x, u = _rows((8, 12), seed=4)
    for op in ("mask", "mag"):
        _value_and_grad(op, x, u, p=4 / 3, method="threshold", regularization_strength=0.3)
    traced = counts["stats"]["unique_graphs"]
    for lam, k in ((0.7, 3), (2.5, 5), (0.05, 2)):
        for op in ("mask", "mag"):
            xr = x.detach().requires_grad_()
            y = getattr(tk, f"soft_topk_{op}")(xr, k, p=4 / 3, method="threshold", regularization_strength=lam)
            want = getattr(tk, f"soft_topk_{op}")(x, k, p=4 / 3, method="pav", regularization_strength=lam)
            np.testing.assert_allclose(y.detach().numpy(), want.numpy(), rtol=0, atol=1e-10)
            torch.autograd.grad(y, xr, u)
    assert counts["stats"]["unique_graphs"] == traced


def test_a_failing_compiler_falls_back_to_the_eager_loop_with_a_warning(compiled_loops, monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_fused, "BACKEND", broken_backend)
    x, u = _rows(seed=3)
    with pytest.warns(RuntimeWarning, match="torch.compile failed on a solver"):
        got = _value_and_grad("mag", x, u, p=4 / 3, method="threshold")
    want = _value_and_grad("mag", x, u, p=4 / 3, method="pav")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-10)
    # The rest of the process runs eagerly, without another warning.
    assert not _fused.use_compiled(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _value_and_grad("mag", x, u, p=4 / 3, method="threshold")


def test_out_of_memory_is_raised_and_keeps_the_compiler(compiled_loops, monkeypatch):
    """Running out of memory is the data's fault: the error reaches the caller, compilation stays on."""
    def no_memory(*args):
        raise torch.OutOfMemoryError("out of memory (a test)")

    with pytest.raises(torch.OutOfMemoryError):
        _fused._call(no_memory, no_memory, 1)
    assert _fused._failures == [] and _fused.use_compiled(torch.zeros(1))


def test_inductor_compiled_loop_matches_pav(monkeypatch):
    """The real compiler (inductor's C++ on the CPU), once: float32 rows, the mask's p = 2 path."""
    monkeypatch.setenv(_fused.ENVIRONMENT_VARIABLE, "always")
    monkeypatch.setattr(_fused, "BACKEND", "inductor")
    monkeypatch.setattr(_fused, "_failures", [])
    x, u = _rows((64, 16), seed=5, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        got = _value_and_grad("mask", x, u, p=2.0, method="threshold")
    want = _value_and_grad("mask", x.double(), u.double(), p=2.0, method="pav")
    np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=0, atol=1e-5 * float(want[1].abs().max()))
