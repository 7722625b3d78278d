"""Autograd glue for the soft operators on (batch, n) rows.

Every route runs the solvers of the custom operators of `topk_torch._ops` (the
host PAV for ``method="pav"``, the Array-API family, on the tensors' own device,
for the other methods): through the dispatcher while `torch.compile` traces,
by their implementation directly in eager mode (`_ops.solve_rows`); `soft_rows`
picks how they are differentiated:

* In eager mode, whenever something may differentiate (grad mode with an
  input that requires grad, forward-mode dual tensors, or any `torch.func`
  transform), `SoftTopk` — an `autograd.Function` with a ctx-free
  ``forward``, ``setup_context``, ``backward``, ``jvp`` and ``vmap`` — wraps
  the operator: backward and forward mode are the core's Jacobian products
  evaluated with torch operations, and a vmapped dimension is folded into
  the batch of rows.  (A custom operator's own autograd formula supports
  neither forward mode nor `torch.func`.)
* Under `torch.compile` the operator is called directly: Dynamo treats it as
  one opaque node through its fake implementation, and its registered
  autograd formula gives the backward.  (Dynamo cannot trace an
  `autograd.Function` that defines a ``jvp``.)  When a `torch.func`
  transform runs inside `torch.compile`, neither serves, and `_linearized`
  rebuilds the output as ``y + J (x - x.detach())`` in plain torch
  operations (g' moved half a step for p != 2): the right value, first and
  second derivatives in every mode; for p != 2 it refuses a third.
* Otherwise (nothing can differentiate) the forward-only operator runs: no
  residuals are computed or kept.  Under `torch.compile` the same choice is
  made while tracing, from ``requires_grad`` and the grad mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
from torch.autograd import forward_ad

from topk_core._agnostic import jacobians
from topk_core._agnostic.residuals import with_gprime

from . import _ops, _products
from ._namespace import xp


def solve(
    kind: str, rows: torch.Tensor, k: int, lam: float, p: float, route: str, max_iter: Any, tol: Any
) -> tuple[Any, ...]:
    """``(y, *residual fields)`` of operator `kind` on `rows`, without autograd."""
    return tuple(_ops.call(kind, rows, k, lam, p, route, max_iter, tol, residuals=True))


class SoftTopk(torch.autograd.Function):
    """(batch, n) rows -> ``(y, *residual fields)``: reverse mode, forward mode and vmap.

    ``apply(rows, spec)``, `spec` the tuple ``(kind, k, regularization_strength, p, q, route,
    max_iter, tol)``: ``kind`` ("mask" or "mag"), ``q`` the conjugate exponent, ``route`` the
    resolved method.  One argument rather than eight: `apply` binds its arguments to the
    signature of ``forward`` on every call, at a cost that grows with their number (a fixed
    cost that small calls feel: `benchmarks/bench_torch.py`, small calls).  Not traced by Dynamo (`soft_rows` calls the operators directly there), so
    ``forward`` calls the solver itself, not through the dispatcher (`_ops.solve_rows`).
    """

    @staticmethod
    def forward(rows: torch.Tensor, spec: tuple[Any, ...]) -> tuple[Any, ...]:
        kind, k, lam, p, _, route, max_iter, tol = spec
        return _ops.solve_rows(kind, rows, k, lam, p, route, max_iter, tol)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        spec = inputs[1]
        ctx.kind, ctx.lam, ctx.p, ctx.q = spec[0], spec[2], spec[3], spec[4]
        res = output[1:]
        ctx.mark_non_differentiable(*res)
        # No zero-filled gradients of the residuals (arrays the size of the rows) for `backward` to ignore.
        ctx.set_materialize_grads(False)
        # The input is kept for second-order derivatives only (p != 2: g' moves with it, see _products).
        kept = (inputs[0] if ctx.q != 2.0 else None, *res)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*kept)
        ctx.save_for_forward(*kept)

    @staticmethod
    def backward(ctx: Any, grad_y: Any, *_: Any) -> tuple[Any, ...]:
        if grad_y is None:  # nothing flowed back through y (grads are not materialized)
            return None, None
        x, *res = ctx.saved_tensors
        res = _products.residuals(ctx.kind, res)
        return _products.vjp(ctx.kind, res, grad_y, x, ctx.p, ctx.q, ctx.lam), None

    @staticmethod
    def jvp(ctx: Any, tangent: Any, *_: Any) -> tuple[Any, ...]:
        x, *res = ctx.saved_tensors
        if tangent is None:  # no tangent for the rows (not materialized as zeros)
            return (None, *([None] * len(res)))
        if ctx.q != 2.0 and _autodiff_levels((TransformType.Jvp,)) > 1:
            # torch.func drops an outer forward-mode level's tangent of this rule's result: zeros in silence.
            raise NotImplementedError(_products.FORWARD_OVER_FORWARD_MESSAGE.format(p=ctx.p))
        res = _products.residuals(ctx.kind, res)
        y_dot = _products.jvp(ctx.kind, res, tangent, x, ctx.p, ctx.q, ctx.lam)
        return (y_dot, *([None] * len(res)))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], rows: torch.Tensor, spec: tuple[Any, ...]) -> tuple[Any, Any]:
        # Every row is independent: a vmapped dimension is one more batch of rows.
        xb = rows.movedim(in_dims[0], 0)
        size, batch, n = xb.shape
        outs = [_ops.unfold(o, size, batch) for o in SoftTopk.apply(xb.reshape(size * batch, n), spec)]
        return tuple(o for o, _ in outs), tuple(d for _, d in outs)


def _may_differentiate(rows: torch.Tensor) -> bool:
    if torch.is_grad_enabled() and rows.requires_grad:
        return True
    if torch._C._are_functorch_transforms_active():
        return True
    return forward_ad.unpack_dual(rows).tangent is not None


def value(kind: str, rows: torch.Tensor, k: int, lam: float, p: float, route: str, max_iter: Any, tol: Any) -> Any:
    """Operator `kind` on `rows`, forward only: no residuals are computed or kept.  Through the dispatcher while
    `torch.compile` traces (the operator is one opaque node), else by the implementation directly."""
    if torch.compiler.is_compiling():
        return _ops.call(kind, rows, k, lam, p, route, max_iter, tol, residuals=False)
    return _ops.solve_rows(kind, rows, k, lam, p, route, max_iter, tol, residuals=False)[0]


def _linearized(
    kind: str, rows: torch.Tensor, k: int, lam: float, p: float, q: float, route: str, max_iter: Any, tol: Any
) -> torch.Tensor:
    """``y + J(g'_half) d`` with ``d = rows - rows.detach()``, from a solve on detached rows, in plain torch
    operations.

    Equal to ``y`` in value, with Jacobian ``J`` for every autodiff mode: the
    route for `torch.func` transforms inside `torch.compile`, where neither
    the custom operator's autograd formula (not supported by `torch.func`)
    nor an `autograd.Function` with a ``jvp`` (not traceable by Dynamo)
    can serve.  For p != 2, ``g'_half = g' + rate J d / 2`` (g' moved half
    its first-order step, `topk_core._agnostic.jacobians.gprime_jvp_rows`)
    makes the second derivatives exact too: the quadratic term of
    ``J(g' + rate J d / 2) d`` is half the operator's second-order term, and
    a second derivative takes it twice.  Beyond second order it refuses.
    Non-finite entries get eager mode's derivatives: infinite outputs (the
    magnitude's infinite entries, returned as they are) the identity's, NaN
    rows NaN.
    """
    if q != 2.0 and _autodiff_levels() > 2:
        # Its third derivative would miss g''s second one in silence.
        raise NotImplementedError(_products.HIGHER_ORDER_MESSAGE.format(p=p))
    if _autodiff_levels((TransformType.Jvp,)) > 1:
        # Compiled forward over forward crashes the process on torch 2.13 (a segmentation fault in the
        # generated code, for `x ** 3` alone): refused here, where it can still be an exception.
        raise NotImplementedError(_products.COMPILED_FORWARD_OVER_FORWARD_MESSAGE)
    primal = rows.detach()
    y, *fields = solve(kind, primal, k, lam, p, route, max_iter, tol)
    res = _products.residuals(kind, fields)
    # inf - inf would be NaN: infinite entries get no difference (the products give them none), while
    # a NaN entry keeps its NaN one, which makes its row's derivatives NaN, as the residuals of eager mode do.
    delta = torch.where(torch.isinf(primal), torch.zeros_like(primal), rows - primal)
    if q != 2.0:
        step = jacobians.gprime_jvp_rows(kind, res, _products.jvp(kind, res, delta, None, p, q, lam), lam, q, xp)
        res = with_gprime(res, res.gprime + 0.5 * step)
    out = y + _products.jvp(kind, res, delta, None, p, q, lam)
    return torch.where(torch.isinf(y), rows, out)


def _autodiff_levels(kinds: tuple[Any, ...] = (TransformType.Grad, TransformType.Jvp)) -> int:
    """How many of the active `torch.func` transforms are of `kinds` (by default those that differentiate:
    grad, vjp, jacrev; jvp, jacfwd), read down the stack of interpreters one level at a time (which Dynamo
    can trace, unlike the stack itself)."""

    def below(interpreter: Any) -> int:
        here = int(interpreter.key() in kinds)
        with interpreter.lower():
            if not torch._C._are_functorch_transforms_active():
                return here
            return here + below(retrieve_current_functorch_interpreter())

    if not torch._C._are_functorch_transforms_active():
        return 0
    return below(retrieve_current_functorch_interpreter())


def soft_rows(
    kind: str, rows: torch.Tensor, k: int, lam: float, p: float, q: float, route: str, max_iter: Any, tol: Any
) -> torch.Tensor:
    """Operator `kind` on (batch, n) rows in float32/float64, differentiable in every mode."""
    args = (kind, k, lam, p, q, route, max_iter, tol)
    if torch.compiler.is_compiling():
        # Static while tracing: requires_grad, grad mode and functorch transforms.
        if torch._C._are_functorch_transforms_active():
            return _linearized(kind, rows, k, lam, p, q, route, max_iter, tol)
        if not (torch.is_grad_enabled() and rows.requires_grad):
            return value(kind, rows, k, lam, p, route, max_iter, tol)
        return solve(kind, rows, k, lam, p, route, max_iter, tol)[0]
    if _may_differentiate(rows):
        return SoftTopk.apply(rows, args)[0]
    return value(kind, rows, k, lam, p, route, max_iter, tol)
