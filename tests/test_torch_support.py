"""What the PyTorch adapter does on a torch release older than its compile floor (`topk_torch._support`).

The tests of the floor itself run the torch tests on an old release (``bash .ci/torch_floor.sh 2.4.1``); these
check, on the installed torch, the fallback those releases get: the operators excluded from compilation
(eager values and gradients inside a compiled function; ``fullgraph=True`` refuses) and the solvers'
loops eager.
"""

from __future__ import annotations

import textwrap

import pytest

torch = pytest.importorskip("torch")

from topk_torch import _fused, _support  # noqa: E402

from ._subprocess import run_python  # noqa: E402


@pytest.mark.parametrize(("version", "release"), [
    ("2.4.1", (2, 4)), ("2.4.1+cpu", (2, 4)), ("2.13.0+cu128", (2, 13)), ("2.10.0a0+git1234", (2, 10)),
])
def test_torch_release_reads_major_and_minor(version, release):
    assert _support.torch_release(version) == release


def test_a_version_that_is_not_one_is_a_clear_error():
    with pytest.raises(ValueError, match="not a torch version"):
        _support.torch_release("nightly")


def test_older_torch_runs_the_solver_loops_eagerly(monkeypatch):
    monkeypatch.setenv(_fused.ENVIRONMENT_VARIABLE, "always")
    monkeypatch.setattr(_fused, "_failures", [])
    assert _fused.use_compiled(torch.zeros(2, 4)) is _support.COMPILES
    monkeypatch.setattr(_support, "COMPILES", False)
    assert not _fused.use_compiled(torch.zeros(2, 4))
    assert _fused.solver_hooks(torch.zeros(2, 4), "threshold").get("loop") is not _fused.compiled_loop


_OLD_TORCH = textwrap.dedent("""
    import torch
    torch.__version__ = "2.4.1"  # what topk_torch reads at import
    import topk_torch as tk
    from topk_torch import _support
    assert not _support.COMPILES

    x = torch.tensor([[3.0, 1.0, 0.9, -2.0], [0.5, -1.5, 2.0, 0.1]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.3, -0.7, 1.1, 2.0]], dtype=torch.float64)
    for op in (tk.soft_topk_mask, tk.soft_topk_mag, tk.hard_topk_mask, tk.hard_topk_mag):
        loss = lambda t: (w * op(t, 2, **({} if op.__name__.startswith("hard") else {"p": 1.5}))).sum()
        want = torch.autograd.grad(loss(x), x)[0]
        torch._dynamo.reset()
        got = torch.autograd.grad(torch.compile(loss, backend="aot_eager")(x), x)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch._dynamo.reset()
        try:
            torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
        except Exception as err:  # Dynamo's refusal of a function excluded from compilation
            print(op.__name__, "refused:", type(err).__name__)
        else:
            raise AssertionError(f"fullgraph=True compiled {op.__name__} on an older torch")
""")


def test_older_torch_keeps_the_operators_out_of_compiled_graphs():
    out = run_python(_OLD_TORCH)
    assert out.count("refused:") == 4, out
