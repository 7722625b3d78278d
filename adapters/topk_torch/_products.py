"""Jacobian products of the soft operators evaluated with torch operations.

The products are the core's (`topk_core.mask_vjp_from_residuals` and
friends), written once against the Array API; here they receive
`array_api_compat.torch` as their namespace, so they run where the residuals
live (CPU or CUDA), under `torch.func` transforms and under `torch.compile`.

The residuals are treated as constants.  That is exact for ``p = 2`` (both
Jacobians are locally constant, so second derivatives vanish almost
everywhere); for any other ``p`` the derivative of the residuals themselves
would be needed, so every product that may be differentiated again gets
`_FirstOrderOnly` of the primal input `x` added: a zero (the residuals
depend on `x` invisibly to autograd; this term makes the dependence visible)
that raises `NotImplementedError` as soon as something differentiates it in
`x`.  Derivatives of a product in its tangent alone (a JVP computed as the
derivative of a VJP in its cotangent) do not reach it: they are exact.
"""

from __future__ import annotations

from typing import Any

import torch

import topk_core
from topk_core import MagResiduals, MaskResiduals

from . import _fused, _host_products
from ._namespace import xp as xp_torch

RESIDUAL_TYPES = {"mask": MaskResiduals, "mag": MagResiduals}

_JVP = {"mask": topk_core.mask_jvp_from_residuals, "mag": topk_core.mag_jvp_from_residuals}
_VJP = {"mask": topk_core.mask_vjp_from_residuals, "mag": topk_core.mag_vjp_from_residuals}

SECOND_ORDER_MESSAGE = (
    "second-order derivatives of sparse_topk soft operators are implemented for p = 2 only (where they are "
    "exactly zero almost everywhere); got p = {p}. Use p = 2, or differentiate once (torch.func.grad, "
    "jacrev or jacfwd, not nested)."
)


class _FirstOrderOnly(torch.autograd.Function):
    """``(x, p) -> zeros like x``, whose derivatives (reverse and forward mode) raise.

    It takes `x` alone, not the product it is added to: autograd then reaches it only when something
    differentiates in `x` (`torch.autograd.grad` with respect to a cotangent runs only the nodes on
    the way to it, and forward mode only those with a tangent)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, p: float) -> torch.Tensor:
        return torch.zeros_like(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.p = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        raise NotImplementedError(SECOND_ORDER_MESSAGE.format(p=ctx.p))

    @staticmethod
    def jvp(ctx: Any, x_dot: Any, _: None) -> torch.Tensor:
        raise NotImplementedError(SECOND_ORDER_MESSAGE.format(p=ctx.p))


def residuals(kind: str, tensors: tuple[Any, ...]) -> Any:
    """The core NamedTuple of residuals of operator `kind` ("mask" or "mag").

    Residual fields are 2-d; None and the 1-d placeholders of the custom
    operators (which cannot return None) stand for absent fields.
    """
    return RESIDUAL_TYPES[kind](*(t if t is not None and t.ndim == 2 else None for t in tensors))


def _guard(out: torch.Tensor, x: Any, p: float, q: float) -> torch.Tensor:
    if q == 2.0 or x is None:
        return out
    return out + _FirstOrderOnly.apply(x, p)


def jvp(kind: str, res: Any, tangent: torch.Tensor, x: Any, p: float, q: float) -> torch.Tensor:
    """`J @ tangent` for (batch, n) rows `x`; differentiable again only for ``p = 2``.

    `x` (the primal rows) may be None when nothing differentiates the result.
    """
    return _guard(_JVP[kind](res, tangent, axis=-1, xp=xp_torch), x, p, q)


def vjp(kind: str, res: Any, cotangent: torch.Tensor, x: Any, p: float, q: float) -> torch.Tensor:
    """`J^T @ cotangent` for (batch, n) rows `x`; differentiable again only for ``p = 2``.

    The guard is only attached when grad mode is on, i.e. when the backward
    pass itself is being recorded (``create_graph=True`` or `torch.func`).
    On CPU tensors the product is the core's Numba one: directly in a plain
    backward, through a custom operator (`_host_products`) in a backward that
    `torch.compile` traces (the magnitude's; the mask's is traced).
    """
    if _plain_host_rows(res, cotangent):
        # A plain backward on the CPU: the core's Numba product on the same memory.
        host = type(res)(*(None if t is None else t.detach().resolve_neg().numpy() for t in res))
        return torch.from_numpy(_VJP[kind](host, cotangent.detach().resolve_neg().numpy(), axis=-1))
    if _fused.use_compiled(cotangent) and _plain_rows(res, cotangent):
        # A plain backward on a device: one compiled product instead of a dozen kernels.
        return _fused.compiled_stage(_COMPILED_VJP[kind])(res, cotangent)
    if _compiled_host_rows(kind, res, cotangent):
        # A compiled backward of the magnitude on the CPU: the Numba product as one opaque operator.
        out = _host_products.product(res, cotangent, transpose=True)
    else:
        out = _VJP[kind](res, cotangent, axis=-1, xp=xp_torch)
    return _guard(out, x, p, q) if torch.is_grad_enabled() else out


def _compiled_host_rows(kind: str, res: Any, cotangent: torch.Tensor) -> bool:
    """A product traced by `torch.compile` (no `torch.func` transform: custom operators' autograd formulas do
    not serve those) that `_host_products` takes, opaque to the compiler: the magnitude's, on CPU rows in
    input order."""
    return (
        torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and _host_products.serves(kind, res, cotangent)
    )


def _mask_vjp_rows(res: Any, cotangent: torch.Tensor) -> torch.Tensor:
    return topk_core.mask_vjp_from_residuals(res, cotangent, axis=-1, xp=xp_torch)


def _mag_vjp_rows(res: Any, cotangent: torch.Tensor) -> torch.Tensor:
    return topk_core.mag_vjp_from_residuals(res, cotangent, axis=-1, xp=xp_torch)


# The products as functions of their arrays alone, for `_fused.compiled_stage`.
_COMPILED_VJP = {"mask": _mask_vjp_rows, "mag": _mag_vjp_rows}


def _unrecorded() -> bool:
    # Grad mode off (an ordinary backward, not ``create_graph``) and no `torch.compile` tracing; asked
    # first, before anything that Dynamo would have to trace.
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling())


def _plain_tensors(res: Any, cotangent: torch.Tensor) -> bool:
    # No `torch.func` transform and no tensor subclass (fake, functional or batched tensors).
    return all(
        type(t) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t)
        for t in (cotangent, *(t for t in res if t is not None))
    )


def _plain_rows(res: Any, cotangent: torch.Tensor) -> bool:
    """Residuals and a cotangent that are plain tensors, in a product that nothing records or
    traces: grad mode off (an ordinary backward, not ``create_graph``), no `torch.compile`
    tracing, no `torch.func` transform and no tensor subclass (fake, functional or batched
    tensors).  Only then may the product be compiled on its own.
    """
    return _unrecorded() and _plain_tensors(res, cotangent)


def _plain_host_rows(res: Any, cotangent: torch.Tensor) -> bool:
    """`_plain_rows` in input order on the CPU (its own dispatch key: wrapped tensors have the type but
    not the key): only then may the product leave torch.  The device is asked before the tensors'
    types, so that a device's backward, which asks `_plain_rows` next, walks them once."""
    return (
        res.perm is None
        and _unrecorded()
        and all(
            torch._C._dispatch_keys(t).has(torch._C.DispatchKey.CPU)
            for t in (cotangent, *(t for t in res if t is not None))
        )
        and _plain_tensors(res, cotangent)
    )
