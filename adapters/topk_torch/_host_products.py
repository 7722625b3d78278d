"""The magnitude's Jacobian products on CPU tensors as a custom operator: what a compiled backward calls.

Eager backward on the CPU already leaves torch for the core's Numba product
(`topk_torch._products`).  Under `torch.compile` the backward is traced
instead, and the products, written against the Array API, became Inductor
kernels.  For the magnitude, whose product decodes each entry's set from its
one-byte code, those took 1.5-3.8x the time of the Numba product behind this
operator (float32, two threads, from (262144, 16) to (1, 10^6):
`benchmarks/bench_torch_compiled.py`, table in docs/torch.md).  The mask's
product, a few elementwise operations and a row sum, Inductor fuses well (it
took 0.6-1.1x the time of the eager backward there), so it stays traced.

``sparse_topk::mag_product_host(gprime, codes, offset, rows, transpose)`` is
``J t`` of the magnitude, or ``J^T u`` with ``transpose``, for residuals in
input order (no permutation, one block per row: the PAV and threshold
methods' layout), with a fake implementation and an autograd formula in
`rows` (the residuals are constants, as everywhere in the adapter): the
derivative of ``J t`` in ``t`` is ``J`` itself, the product the other way.
(PyTorch does not differentiate a compiled backward again, so the formula
serves the operator's own checks and any differentiation of it outside one.)
"""

from __future__ import annotations

from typing import Any

import torch

import topk_core
from topk_core import MagResiduals


def _host(t: torch.Tensor) -> Any:
    return t.detach().resolve_neg().contiguous().numpy()


# The schema is spelled out: torch < 2.5 cannot infer one from string annotations (`from __future__`).
@torch.library.custom_op("sparse_topk::mag_product_host", mutates_args=(), device_types="cpu",
                         schema="(Tensor gprime, Tensor codes, Tensor offset, Tensor rows, bool transpose) -> Tensor")
def mag_product_host(
    gprime: torch.Tensor, codes: torch.Tensor, offset: torch.Tensor, rows: torch.Tensor, transpose: bool
) -> torch.Tensor:
    """``J t`` of the soft magnitude operator, or ``J^T u`` with `transpose`, on (batch, n) CPU rows."""
    res = MagResiduals(None, None, None, None, _host(gprime), _host(codes), _host(offset))
    product = topk_core.mag_vjp_from_residuals if transpose else topk_core.mag_jvp_from_residuals
    return torch.from_numpy(product(res, _host(rows), axis=-1))


@mag_product_host.register_fake
def _(gprime: torch.Tensor, codes: torch.Tensor, offset: torch.Tensor, rows: torch.Tensor,
      transpose: bool) -> torch.Tensor:
    return torch.empty_like(rows, memory_format=torch.contiguous_format)


def _save_residuals(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs[:3])
    ctx.transpose = inputs[4]


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    gprime, codes, offset = ctx.saved_tensors
    return None, None, None, mag_product_host(gprime, codes, offset, grad, not ctx.transpose), None


mag_product_host.register_autograd(_backward, setup_context=_save_residuals)


def serves(kind: str, res: Any, rows: torch.Tensor) -> bool:
    """Whether the product of operator `kind` with residuals `res` and `rows` goes through `mag_product_host`:
    the magnitude's, CPU tensors in input order, one block per row (devices are known while tracing)."""
    return (
        kind == "mag"
        and res.perm is None
        and res.block_start is None
        and rows.device.type == "cpu"
        and all(t.device.type == "cpu" for t in res if t is not None)
    )


def product(res: Any, rows: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The magnitude's product of residuals `res` with (batch, n) `rows` through `mag_product_host`."""
    return mag_product_host(res.gprime, res.codes, res.offset, rows, transpose)
