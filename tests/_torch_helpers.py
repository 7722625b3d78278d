"""Helpers of the PyTorch adapter tests.

* `quiet_lazy_torch_imports`: torch imports a few modules lazily on first use
  (the forward-mode decompositions on the first dual tensor, Inductor on the
  first `torch.compile`), and those imports emit DeprecationWarnings from
  torch's own code (`torch.jit.script`), which the suite turns into errors.
  Importing them up front, with those warnings silenced, keeps the tests'
  own warnings strict.
* `separated_rows`: test inputs (the closed-form Jacobian oracles live in
  `tests/_oracles.py`).
* `requires_compile`: a skip mark for tests of `torch.compile` on a torch
  release older than the adapter's compile floor (`topk_torch._support`).
* `triton_compiler_environment`: the environment of a subprocess that compiles
  the Triton kernels for a GPU (`topk_core._triton_rows.compile_ahead`).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest


def quiet_lazy_torch_imports() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch._decomp.decompositions_for_jvp
        import torch._inductor.compile_fx  # noqa: F401


def compile_skip_reason() -> str | None:
    """Why `torch.compile` tests cannot run here: the installed torch is older than
    `topk_torch._support.COMPILE_FLOOR` (there the operators are excluded from compilation, which
    tests/test_torch_support.py checks); None where they can."""
    from topk_torch import _support

    floor = ".".join(map(str, _support.COMPILE_FLOOR))
    return None if _support.COMPILES else f"torch.compile of the operators needs torch >= {floor}"


def requires_compile() -> pytest.MarkDecorator:
    """A skip mark for `torch.compile` tests (`compile_skip_reason`)."""
    reason = compile_skip_reason()
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def separated_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of well-separated values (away from kinks, as finite differences need), float64."""
    n = shape[-1]
    base = np.linspace(-2.0, 2.0, n)
    rows = [rng.permutation(base) + rng.uniform(-0.02, 0.02, n) for _ in range(int(np.prod(shape[:-1])))]
    return np.stack(rows).reshape(shape)


def triton_compiler_environment() -> dict[str, str]:
    """This process's environment without ``TRITON_INTERPRET`` (which tests/conftest.py sets where there is
    no CUDA, and under which the kernels cannot be compiled), for a subprocess that compiles the kernels
    ahead of time; skips the test on a Triton whose compiler API `compile_ahead` does not call."""
    import pytest

    from topk_core import _triton_rows

    if not _triton_rows.compiles_ahead():
        pytest.skip("this Triton predates the compiler API of compile_ahead")
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
