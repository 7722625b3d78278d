"""Array backends for the core tests of the Array-API methods (threshold, Dykstra, auto).

Each backend converts NumPy float64 test data to its own arrays and back, so
that the same test runs on numpy, torch (CPU), jax (with x64) and
array_api_strict (on its second device, "device1", which catches arrays made
on the default device the way a CUDA tensor does).  `assert_like` checks
namespace, dtype, shape and device before any value is compared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from array_api_compat import array_namespace, device

import topk_core as tc

BACKENDS = ["numpy", "torch", "jax", "array_api_strict"]

# The core's forward (with residuals) and Jacobian products, by operator.
FORWARD = {"mask": tc.soft_topk_mask_forward, "mag": tc.soft_topk_mag_forward}
JVP = {"mask": tc.mask_jvp_from_residuals, "mag": tc.mag_jvp_from_residuals}
VJP = {"mask": tc.mask_vjp_from_residuals, "mag": tc.mag_vjp_from_residuals}


@dataclass(frozen=True)
class Backend:
    name: str
    to: Callable[[np.ndarray], Any]

    def back(self, a: Any) -> np.ndarray:
        if self.name == "array_api_strict":  # its second device refuses NumPy's conversion
            import array_api_strict as xs

            a = a.to_device(xs.Device("CPU_DEVICE"))
        return np.asarray(a)

    def assert_like(self, out: Any, x: Any) -> None:
        assert array_namespace(out) is array_namespace(x)
        assert out.dtype == x.dtype
        assert tuple(out.shape) == tuple(x.shape)
        assert device(out) == device(x)


@contextlib.contextmanager
def backend_context(name: str) -> Iterator[Backend]:
    if name == "numpy":
        yield Backend(name, lambda a: np.array(a))
    elif name == "torch":
        torch = pytest.importorskip("torch")
        yield Backend(name, lambda a: torch.asarray(np.array(a)))
    elif name == "jax":
        jax = pytest.importorskip("jax")
        jnp = pytest.importorskip("jax.numpy")
        with jax.enable_x64(True):
            yield Backend(name, lambda a: jnp.asarray(a))
    else:
        xs = pytest.importorskip("array_api_strict")
        # Not its default device: an array the core makes without `device=` (on the default one)
        # cannot be combined with these, the error a CUDA tensor meets (a check that needs no GPU).
        second = xs.Device("device1")
        yield Backend(name, lambda a: xs.asarray(np.array(a), device=second))


def cuda_torch() -> Any:
    """torch with a CUDA device, or skip."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch
