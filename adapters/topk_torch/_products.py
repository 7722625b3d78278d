"""Jacobian products of the soft operators evaluated with torch operations.

The products are the core's (`topk_core.mask_vjp_from_residuals` and
friends), written once against the Array API; here they receive
`array_api_compat.torch` as their namespace, so they run where the residuals
live (CPU or CUDA), under `torch.func` transforms and under `torch.compile`.

Second order.  For ``p = 2`` the residuals are locally constant (both
Jacobians are, so second derivatives vanish almost everywhere).  For any other
``p``, g' moves with x: every product that may be differentiated again reads
g' through `_MovingGprime`, a copy of it whose derivative in the primal
input `x` is g''s own (``dg' = rate J dx``, `topk_core._agnostic.jacobians`),
so that second derivatives (``create_graph=True``, `torch.func.hessian`,
nested ``jacrev``/``jacfwd``) are exact.  Its own derivatives get
`_RefuseHigherOrder` of `x` added: a zero that raises `NotImplementedError` as
soon as something differentiates it in `x` (a third derivative).
Derivatives in the tangents alone (a JVP computed as the derivative of a
VJP in its cotangent) never reach either: they are exact at every order.
"""

from __future__ import annotations

from typing import Any

import torch

import topk_core
from topk_core import MagResiduals, MaskResiduals
from topk_core._agnostic import jacobians
from topk_core._agnostic.residuals import with_gprime

from . import _fused, _host_products, _support
from ._namespace import xp as xp_torch

RESIDUAL_TYPES = {"mask": MaskResiduals, "mag": MagResiduals}

_JVP = {"mask": topk_core.mask_jvp_from_residuals, "mag": topk_core.mag_jvp_from_residuals}
_VJP = {"mask": topk_core.mask_vjp_from_residuals, "mag": topk_core.mag_vjp_from_residuals}

HIGHER_ORDER_MESSAGE = (
    "derivatives of order three and higher of sparse_topk soft operators are implemented for p = 2 only "
    "(where they are exactly zero almost everywhere); got p = {p}. First and second-order derivatives work "
    "for every p."
)


FORWARD_OVER_FORWARD_MESSAGE = (
    "second-order derivatives of sparse_topk soft operators by forward mode over forward mode (jacfwd of "
    "jacfwd, jvp of jvp) are not supported for p != 2 (got p = {p}): torch.func drops the outer tangent of "
    "a custom function's forward-mode rule. Use torch.func.hessian (forward over reverse) or jacrev."
)

COMPILED_FORWARD_OVER_FORWARD_MESSAGE = (
    "torch.compile of forward mode over forward mode (jacfwd of jacfwd, jvp of jvp) through sparse_topk soft "
    "operators is refused: on torch 2.13 the compiled code crashes the process (a segmentation fault, even "
    "for x ** 3 alone). Use torch.func.hessian (forward over reverse) or jacrev of jacrev."
)


class _RefuseHigherOrder(torch.autograd.Function):
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
        raise NotImplementedError(HIGHER_ORDER_MESSAGE.format(p=ctx.p))

    @staticmethod
    def jvp(ctx: Any, x_dot: Any, _: None) -> torch.Tensor:
        raise NotImplementedError(HIGHER_ORDER_MESSAGE.format(p=ctx.p))


class _MovingGprime(torch.autograd.Function):
    """``(x, kind, p, q, strength, *residual fields) -> g'`` (a copy), with the derivative in the rows `x`
    that g' has.

    Reverse mode: ``J^T (rate * u)``; forward mode: ``rate * (J x_dot)``
    (`topk_core._agnostic.jacobians.gprime_vjp_rows` / `gprime_jvp_rows`), from the residuals as
    constants, plus `_RefuseHigherOrder` of `x`: exact for second-order derivatives of the operators,
    refused beyond.  (Flat arguments: its generated vmap rule reads a tuple as a tree of inputs.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, kind: str, p: float, q: float, lam: Any, *fields: Any) -> torch.Tensor:
        return residuals(kind, fields).gprime.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, ctx.kind, ctx.p, ctx.q, lam, *fields = inputs
        ctx.lam_is_tensor = isinstance(lam, torch.Tensor)
        saved = (x, lam if ctx.lam_is_tensor else None, *fields)
        ctx.lam = None if ctx.lam_is_tensor else lam
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, lam, res = _unpack(ctx)
        cotangent = jacobians.gprime_vjp_rows(ctx.kind, res, grad, lam, ctx.q, xp_torch)
        out = _VJP[ctx.kind](res, cotangent, axis=-1, xp=xp_torch)
        return (_refuse_higher(out, x, ctx.p), None, None, None, None, *([None] * len(res)))

    @staticmethod
    def jvp(ctx: Any, x_dot: Any, *_: Any) -> torch.Tensor:
        x, lam, res = _unpack(ctx)
        y_dot = _JVP[ctx.kind](res, x_dot, axis=-1, xp=xp_torch)
        return _refuse_higher(jacobians.gprime_jvp_rows(ctx.kind, res, y_dot, lam, ctx.q, xp_torch), x, ctx.p)


def _unpack(ctx: Any) -> tuple[torch.Tensor, Any, Any]:
    """(x, strength, residuals) saved by `_MovingGprime.setup_context`."""
    x, lam, *fields = ctx.saved_tensors
    return x, lam if ctx.lam_is_tensor else ctx.lam, residuals(ctx.kind, fields)


def _refuse_higher(out: torch.Tensor, x: torch.Tensor, p: float) -> torch.Tensor:
    return out + _RefuseHigherOrder.apply(x, p) if torch.is_grad_enabled() else out


def _moving(kind: str, res: Any, x: Any, p: float, q: float, lam: Any) -> Any:
    """`res` whose g' moves with `x` (`_MovingGprime`) for p != 2; `res` itself for p = 2 or without `x`."""
    if q == 2.0 or x is None:
        return res
    return with_gprime(res, _MovingGprime.apply(x, kind, p, q, lam, *res))


def residuals(kind: str, tensors: tuple[Any, ...]) -> Any:
    """The core NamedTuple of residuals of operator `kind` ("mask" or "mag").

    Residual fields are 2-d; None and the 1-d placeholders of the custom
    operators (which cannot return None) stand for absent fields.
    """
    return RESIDUAL_TYPES[kind](*(t if t is not None and t.ndim == 2 else None for t in tensors))


def jvp(kind: str, res: Any, tangent: torch.Tensor, x: Any, p: float, q: float, lam: Any) -> torch.Tensor:
    """`J @ tangent` for (batch, n) rows `x` at strength `lam`, differentiable again in `x` (second order).

    `x` (the primal rows) may be None when nothing differentiates the result.
    """
    return _JVP[kind](_moving(kind, res, x, p, q, lam), tangent, axis=-1, xp=xp_torch)


def vjp(kind: str, res: Any, cotangent: torch.Tensor, x: Any, p: float, q: float, lam: Any) -> torch.Tensor:
    """`J^T @ cotangent` for (batch, n) rows `x` at strength `lam`, differentiable again in `x` when
    recorded (grad mode on: ``create_graph=True`` or `torch.func`).

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
    if torch.is_grad_enabled() and q != 2.0 and x is not None:
        # Recorded: g' moves with x.
        return _VJP[kind](_moving(kind, res, x, p, q, lam), cotangent, axis=-1, xp=xp_torch)
    if _compiled_host_rows(kind, res, cotangent):
        # A compiled backward of the magnitude on the CPU: the Numba product as one opaque operator.
        return _host_products.product(res, cotangent, transpose=True)
    return _VJP[kind](res, cotangent, axis=-1, xp=xp_torch)


def _compiled_host_rows(kind: str, res: Any, cotangent: torch.Tensor) -> bool:
    """A product traced by `torch.compile` (no `torch.func` transform: custom operators' autograd formulas do
    not serve those) that `_host_products` takes, opaque to the compiler: the magnitude's, on CPU rows in
    input order."""
    return (
        _support.tracing()
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
