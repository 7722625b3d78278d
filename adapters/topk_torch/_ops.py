"""The solvers as PyTorch custom operators (namespace ``sparse_topk``).

Two families, each for both operators (``mask`` and ``mag``):

* ``sparse_topk::soft_topk_{mask,mag}_pav(x, k, regularization_strength, p)``:
  the Numba PAV of the core on host memory (CPU tensors only; the public
  functions copy CUDA tensors to the host explicitly).
* ``sparse_topk::soft_topk_{mask,mag}_array_api(x, k, regularization_strength,
  p, method, max_iter, tol)``: the core's pure Array-API methods
  (``"threshold"``, ``"dykstra"``) evaluated with torch operations, on any
  device.  Wrapping them in an operator keeps their data-dependent loops
  away from Dynamo, so ``torch.compile(fullgraph=True)`` works with them too.

Each takes rows ``x`` of shape (batch, n) in float32 or float64 and returns
``(y, *residuals)``: the output and the fields of `topk_core.MaskResiduals`
/ `topk_core.MagResiduals` (contiguous; a field that the core leaves as None
comes back as an empty 1-d placeholder, see `layout`).  The operators are
opaque to `torch.compile` (a fake implementation gives the output metadata),
never modify their input, and are registered with

* an autograd formula whose backward is the core's vector-Jacobian product
  evaluated with torch operations (residuals saved only when an input
  requires grad);
* a vmap rule: a vmapped dimension is one more batch of rows.

The ``..._value`` variants return ``y`` alone (the core's forward-only solve,
which skips the residuals); they have no autograd formula and serve the
calls that nothing differentiates.

Forward-mode AD is not available on a custom operator; the public functions
wrap these operators in an `autograd.Function` that adds it (see
`topk_torch._functions`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

import topk_core
from topk_core import MagResiduals, MaskResiduals, _validate
from topk_core._agnostic.regularizer import conjugate_exponent
from topk_core._api import _AGNOSTIC

from . import _fused, _products, _support, _triton_rows
from ._namespace import xp as xp_torch

KINDS = ("mask", "mag")
FAMILIES = ("pav", "array_api")
_FORWARD = {"mask": topk_core.soft_topk_mask_forward, "mag": topk_core.soft_topk_mag_forward}
_VALUE = {"mask": topk_core.soft_topk_mask, "mag": topk_core.soft_topk_mag}
_FIELDS = {"mask": MaskResiduals._fields, "mag": MagResiduals._fields}
_BASE_SCHEMA = "Tensor x, int k, Tensor regularization_strength, float p"
_EXTRA_SCHEMA = {"pav": "", "array_api": ", str method, int? max_iter, float? tol"}


class Field(NamedTuple):
    """How the core lays out one residual field: absent (None), or its dtype and its last dimension."""

    present: bool
    dtype: torch.dtype | None  # None: the dtype of the rows
    width_is_n: bool  # (batch, n) if True, (batch, 1) if False


@functools.cache
def layout(kind: str, method: str = "pav") -> tuple[Field, ...]:
    """The residual layout of one of the core's methods, read once from a probe of rows of 3 entries.

    The core documents two layouts (input order without block ids, or working
    order with blocks) and fields of shape (batch, n) or (batch, 1), by
    method; the fake implementations must give exact metadata, so it is read
    from the core instead of being copied here, and every real call checks it.
    PAV's probe has no rows: the core runs (and compiles) no kernel for it, where
    two float64 rows compiled two kernels that a float32 caller never uses (45 s
    on an empty Numba cache).
    """
    # Real tensors even where the first call is traced (`torch.compile` of a fresh process runs the fake
    # implementations, which ask for this, with fake tensors: the probe's solver loop then read a
    # data-dependent value and the compilation failed, "Could not guard on data-dependent expression").
    with unset_fake_temporarily():
        if method == "pav":
            rows, probe, xp = 0, np.zeros((0, 3)), None
        else:
            rows, probe, xp = 2, torch.zeros((2, 3), dtype=torch.float64), xp_torch
        _, res = _FORWARD[kind](probe, 1, p=2.0, method=method, xp=xp)
        res = [None if a is None else np.asarray(a) for a in res]
    fields = []
    for name, a in zip(_FIELDS[kind], res, strict=True):
        if a is None:
            fields.append(Field(False, None, True))
            continue
        if a.shape not in ((rows, 3), (rows, 1)):
            raise RuntimeError(f"topk_torch: unexpected shape {a.shape} of residual {name!r} for ({rows}, 3) rows")
        dtype = {np.dtype(np.int64): torch.int64, np.dtype(np.int8): torch.int8, np.dtype(np.bool_): torch.bool}.get(a.dtype)
        if dtype is None and a.dtype != np.float64:
            raise RuntimeError(f"topk_torch: unexpected dtype {a.dtype} of residual {name!r} for float64 rows")
        fields.append(Field(True, dtype, a.shape == (rows, 3)))
    return tuple(fields)


def _shape(x: torch.Tensor, field: Field) -> tuple[int, ...]:
    if not field.present:
        return (0,)
    return (x.shape[0], x.shape[1] if field.width_is_n else 1)


def _empty(x: torch.Tensor, field: Field) -> torch.Tensor:
    # An absent field is an empty 1-d placeholder (custom operators cannot return None).
    return x.new_empty(_shape(x, field), dtype=(field.dtype or x.dtype) if field.present else torch.int64)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.ndim != 2 or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"sparse_topk::{name} takes (batch, n) rows in float32 or float64; got shape {tuple(x.shape)} "
            f"and dtype {x.dtype} (use topk_torch.soft_topk_{name.split('_')[2]}, which handles any shape)"
        )


def _from_numpy(a: Any, source: np.ndarray) -> torch.Tensor:
    # Fresh, writable, C-contiguous memory that never aliases the input.
    a = np.asarray(a)
    if not (a.flags.c_contiguous and a.flags.writeable) or np.may_share_memory(a, source):
        a = np.array(a, order="C", copy=True)
    return torch.from_numpy(a)


class _Fresh:
    """Makes torch outputs contiguous and distinct from the input and from each other."""

    def __init__(self, x: torch.Tensor) -> None:
        self.seen = {x.untyped_storage().data_ptr()}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in self.seen:
            t = t.clone()
        self.seen.add(t.untyped_storage().data_ptr())
        return t


def _residual_tensors(kind: str, method: str, x: torch.Tensor, res: Any, convert: Callable) -> list[torch.Tensor]:
    out = []
    for name, field, a in zip(_FIELDS[kind], layout(kind, method), res, strict=True):
        if (a is None) == field.present:
            raise RuntimeError(f"topk_torch: residual {name!r} of the core does not follow its probed layout")
        t = _empty(x, field) if a is None else convert(a)
        if a is not None and (tuple(t.shape) != _shape(x, field) or t.dtype != (field.dtype or x.dtype)):
            raise RuntimeError(
                f"topk_torch: residual {name!r} of the core has shape {tuple(t.shape)} and dtype {t.dtype}, "
                "not its probed layout"
            )
        out.append(t)
    return out


def _solve(family: str, kind: str, x: torch.Tensor, k: int, lam: float, p: float, *extra: Any,
           residuals: bool) -> tuple[torch.Tensor, ...]:
    """Run the core on `x`; ``(y, *residual tensors)``, or ``(y,)`` when `residuals` is False."""
    solver = _FORWARD[kind] if residuals else _VALUE[kind]
    if family == "pav":
        method, max_iter, tol = "pav", None, None
        arr = x.detach().resolve_neg().numpy()
        out = solver(arr, k, regularization_strength=lam, p=p, axis=-1, method="pav")
        convert = functools.partial(_from_numpy, source=arr)
    else:
        # The core's solver itself on the rows (checked again: the operator is public), with the
        # compiled loop and stages that `_fused` picks for the rows' device.
        method, max_iter, tol = extra
        k, lam, p = _validate.check_k(k, x.shape[-1], -1), _validate.check_strength(lam), _validate.check_p(p)
        method = _validate.check_method(method, p, max_iter, tol, auto="threshold")
        q = conjugate_exponent(p)
        out = None
        if method == "threshold" and _triton_rows.usable(x, k, max_iter, tol):
            # Short rows on a GPU: one kernel launch (None where the kernel cannot run here).
            out = _triton_rows.solve(kind, x, k, lam, q, residuals)
        if out is None:
            out = _AGNOSTIC[method, kind](x.detach(), k, lam, q, xp_torch, max_iter=max_iter, tol=tol,
                                          **_fused.solver_hooks(x, method))
        out = out if residuals else out[0]
        convert = _Fresh(x)
    if not residuals:
        return (convert(out),)
    y, res = out
    return (convert(y), *_residual_tensors(kind, method, x, res, convert))


def unfold(t: torch.Tensor, size: int, batch: int) -> tuple[torch.Tensor, int | None]:
    """Split the leading dimension of a (size * batch, w) output; placeholders are unbatched."""
    if t.ndim != 2:
        return t, None
    return t.reshape(size, batch, t.shape[-1]), 0


def _register_vmap(op: Any, n_out: int | None) -> None:
    def vmap_rule(info: Any, in_dims: tuple[Any, ...], x: torch.Tensor, *args: Any) -> tuple[Any, Any]:
        if in_dims[0] is None:
            return op(x, *args), (None if n_out is None else (None,) * n_out)
        xb = x.movedim(in_dims[0], 0)
        size, batch, n = xb.shape
        outs = op(xb.reshape(size * batch, n), *args)
        if n_out is None:
            return outs.reshape(size, batch, n), 0
        outs = [unfold(o, size, batch) for o in outs]
        return tuple(o for o, _ in outs), tuple(d for _, d in outs)

    if hasattr(op, "register_vmap"):  # torch >= 2.5; see docs/torch.md, "Older torch releases"
        op.register_vmap(vmap_rule)


def _make_op(family: str, kind: str) -> Any:
    name = f"soft_topk_{kind}_{family}"
    n_out = 1 + len(_FIELDS[kind])
    n_args = 4 if family == "pav" else 7
    schema = f"({_BASE_SCHEMA}{_EXTRA_SCHEMA[family]}) -> ({', '.join(['Tensor'] * n_out)})"

    def impl(x: torch.Tensor, k: int, regularization_strength: torch.Tensor, p: float, *extra: Any) -> tuple[Any, ...]:
        _check_rows(x, name)
        return _solve(family, kind, x, k, float(regularization_strength), p, *extra, residuals=True)

    device_types = "cpu" if family == "pav" else None
    op = torch.library.custom_op(f"sparse_topk::{name}", impl, mutates_args=(), device_types=device_types,
                                 schema=schema)

    @op.register_fake
    def _(x: torch.Tensor, k: int, regularization_strength: torch.Tensor, p: float, *extra: Any) -> tuple[Any, ...]:
        _check_rows(x, name)
        method = "pav" if family == "pav" else extra[0]
        return (x.new_empty(tuple(x.shape)), *(_empty(x, f) for f in layout(kind, method)))

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        ctx.p, ctx.q = inputs[3], conjugate_exponent(inputs[3])
        ctx.mark_non_differentiable(*output[1:])
        # No zero-filled gradients of the residuals for `backward` to ignore (as `_functions.SoftTopk`).
        ctx.set_materialize_grads(False)
        # The input and strength are kept for second-order derivatives only (p != 2: g' moves with x, see
        # _products).
        moving = ctx.q != 2.0
        ctx.save_for_backward(inputs[0] if moving else None, inputs[2] if moving else None, *output[1:])

    def backward(ctx: Any, grad_y: Any, *_: Any) -> tuple[Any, ...]:
        none = (None,) * (n_args - 1)
        if grad_y is None or not ctx.needs_input_grad[0]:
            return (None, *none)
        x, lam, *res = ctx.saved_tensors
        return (_products.vjp(kind, _products.residuals(kind, res), grad_y, x, ctx.p, ctx.q, lam), *none)

    op.register_autograd(backward, setup_context=setup_context)
    _register_vmap(op, n_out)
    return op


def _make_value_op(family: str, kind: str) -> Any:
    name = f"soft_topk_{kind}_{family}_value"
    schema = f"({_BASE_SCHEMA}{_EXTRA_SCHEMA[family]}) -> Tensor"

    def impl(x: torch.Tensor, k: int, regularization_strength: torch.Tensor, p: float, *extra: Any) -> torch.Tensor:
        _check_rows(x, name)
        return _solve(family, kind, x, k, float(regularization_strength), p, *extra, residuals=False)[0]

    device_types = "cpu" if family == "pav" else None
    op = torch.library.custom_op(f"sparse_topk::{name}", impl, mutates_args=(), device_types=device_types,
                                 schema=schema)

    @op.register_fake
    def _(x: torch.Tensor, k: int, regularization_strength: torch.Tensor, p: float, *extra: Any) -> torch.Tensor:
        _check_rows(x, name)
        return x.new_empty(tuple(x.shape))

    _register_vmap(op, None)
    return op


# (y, *residuals) with an autograd formula, and y alone (forward only: no residuals computed).
OPS = {(family, kind): _make_op(family, kind) for family in FAMILIES for kind in KINDS}
VALUE_OPS = {(family, kind): _make_value_op(family, kind) for family in FAMILIES for kind in KINDS}


def solve_rows(kind: str, rows: torch.Tensor, k: int, lam: float, p: float, route: str, max_iter: Any,
               tol: Any, residuals: bool = True) -> tuple[torch.Tensor, ...]:
    """What the operator of `route` returns, ``(y, *residuals)`` (or its ``..._value`` variant, ``(y,)``),
    computed by its implementation directly: for eager callers that the dispatcher need not see (an
    `autograd.Function`'s forward, which autograd and `torch.func` already handle, and calls that nothing
    differentiates), whose fixed cost per call small calls feel (`benchmarks/bench_torch.py`, small calls)."""
    if _support.tracing():
        # make_fx (torch.func.linearize, torch.export) would trace into the implementation, whose loops
        # read their data (the Array-API methods failed): the operator is one node of the graph instead.
        out = call(kind, rows, k, lam, p, route, max_iter, tol, residuals)
        return tuple(out) if residuals else (out,)
    family = "pav" if route == "pav" else "array_api"
    name = f"soft_topk_{kind}_{family}"
    _check_rows(rows, name)
    if family == "pav" and rows.device.type != "cpu":
        raise RuntimeError(f"sparse_topk::{name} runs on CPU tensors only; got a tensor on {rows.device}")
    extra = () if family == "pav" else (route, max_iter, tol)
    return _solve(family, kind, rows, k, lam, p, *extra, residuals=residuals)


def call(kind: str, rows: torch.Tensor, k: int, lam: float, p: float, route: str, max_iter: Any, tol: Any,
         residuals: bool) -> Any:
    """The operator of `route` ("pav" or an Array-API method) on `rows`: a tuple, or `y` alone."""
    family = "pav" if route == "pav" else "array_api"
    # The strength as a 0-d tensor: under torch.compile a float argument of a custom operator is
    # specialized (a strength annealed during training compiled again at every new value, and
    # `fullgraph=True` failed hard at Dynamo's recompile limit, the 9th value); a tensor made from it by
    # arithmetic is not (torch.tensor, torch.scalar_tensor and torch.full of it were, in torch 2.13).
    strength = torch.zeros((), dtype=torch.float64) + lam
    args = (rows, k, strength, p) if family == "pav" else (rows, k, strength, p, route, max_iter, tol)
    return (OPS if residuals else VALUE_OPS)[family, kind](*args)
