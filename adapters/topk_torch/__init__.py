"""sparse-topk for PyTorch: the four operators, differentiable in every autograd mode.

The mathematics lives in `topk_core`; see `topk_core.soft_topk_mask` and
`topk_core.soft_topk_mag`.  Names, keywords, defaults and numbers are those of
`topk_numpy`.

* Every solver of the core is a custom operator (``torch.ops.sparse_topk``:
  ``soft_topk_{mask,mag}_pav``, the Numba PAV on the CPU, and
  ``soft_topk_{mask,mag}_array_api``, the threshold and Dykstra methods on
  any device) with a fake implementation, an autograd formula and a vmap
  rule, so ``loss.backward()``, `torch.autograd.gradcheck` and
  ``torch.compile(fullgraph=True)`` work.  In eager mode the operators are
  wrapped in an `autograd.Function` with a forward-mode rule, so
  `torch.func.grad`, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd`` and ``vmap``
  (and their nestings) work too; `torch.func` transforms inside
  `torch.compile` take a linearized route (see `topk_torch._functions`).
  Backward and forward mode are the core's closed-form Jacobian products
  (never through the iterations): a plain backward on the CPU runs the
  core's Numba product on the tensors' memory (`topk_torch._products`), a
  plain backward on CUDA one compiled product (`topk_torch._fused`), and
  forward mode, `torch.func` transforms and ``create_graph=True`` evaluate
  them with torch operations (under `torch.compile`, the magnitude's CPU
  product is a custom operator: `topk_torch._host_products`).
* Second-order derivatives are exact for every ``p`` (zero almost everywhere
  for ``p = 2``); for ``p != 2`` a third order and forward mode over forward
  mode raise `NotImplementedError` (see ``docs/torch.md``).
* `x` must be a `torch.Tensor`.  float32 and float64 natively; float16 and
  bfloat16 are computed in float32 and returned in the input dtype.  The
  output has the shape, dtype and device of `x`; `x` is never modified.
* Devices: ``method="auto"`` is ``"pav"`` on the CPU; on a GPU it is
  ``"pav"`` for calls of at most 2^21 entries and ``"threshold"`` (on the
  device, compiled: `topk_torch._fused`) above, the faster of the
  two on an H200 (docs/methods.md).  ``"pav"`` on a CUDA tensor copies the
  rows to host memory and the result back (``.to("cpu")`` /
  ``.to(x.device)``, explicit and differentiable; the backward runs on the
  host too).  Never ``.numpy()`` on a device tensor.
* The Python scalars (`k`, `regularization_strength`, `p`, `axis`, `method`,
  `max_iter`, `tol`) are validated before any computation, with the errors
  of `topk_numpy`.
"""

from __future__ import annotations

from typing import Any

import torch

import topk_core
from topk_core import _validate
from topk_core._agnostic.regularizer import conjugate_exponent
from topk_core._api import DEFAULT_P, DEFAULT_STRENGTH, compute_dtype

from . import _support
from . import nn as nn  # topk_torch.nn: pruning, MoE router and layer, top-k loss
from ._functions import soft_rows
from ._namespace import xp as xp_torch

__version__ = topk_core.__version__

__all__ = [
    "__version__",
    "hard_topk_mag",
    "hard_topk_mask",
    "soft_topk_mag",
    "soft_topk_mask",
]


def _as_tensor(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"`x` must be a torch.Tensor; got {type(x).__name__}. Convert it first, e.g. torch.as_tensor(x), "
            "or use topk_numpy for NumPy arrays"
        )
    return x


def _validated(x: torch.Tensor, k: Any, axis: Any) -> tuple[int, int]:
    _validate.check_float_dtype(x, xp_torch)
    ax = _validate.check_axis(axis, x.ndim)
    return _validate.check_k(k, x.shape[ax], ax), ax


# On a GPU, "pav" (a round trip to the host) beat the threshold method, loop compiled, up to about
# 2^21 entries per call, forward+backward (an H200: 1-7 ms against 10-23 ms from 256 rows of 64 to
# one row of 10^6; even at 2^22; 41-94 ms against 581-702 ms at 2^26): docs/methods.md.
PAV_ON_DEVICE_MAX_ENTRIES = 2**21  # on CUDA devices


def _auto_method(x: torch.Tensor) -> str:
    """What ``method="auto"`` runs for `x`: the rule of `topk_core._api.auto_method`, and small device calls.

    "pav" (the Numba solver, reading CPU memory without a copy) on the CPU;
    on CUDA devices "pav" (an explicit round trip to the host) up to
    `PAV_ON_DEVICE_MAX_ENTRIES` entries, "threshold" (pure Array API, on the
    tensor's device) above; "threshold" on other devices (not measured).
    The core never copies device arrays itself, so its own rule is
    "threshold" on every device.  Written here on ``x.device`` because the
    core's version inspects the namespace through `lru_cache`-wrapped
    helpers that `torch.compile` warns about; a test checks that both agree
    where they should.
    """
    kind = x.device.type
    return "pav" if kind == "cpu" or (kind == "cuda" and x.numel() <= PAV_ON_DEVICE_MAX_ENTRIES) else "threshold"


@_support.compiled_from_the_floor
def _soft_op(
    kind: str, x: Any, k: Any, regularization_strength: Any, p: Any, axis: Any, method: Any, max_iter: Any,
    tol: Any,
) -> torch.Tensor:
    x = _as_tensor(x)
    k, ax = _validated(x, k, axis)
    lam = _validate.check_strength(regularization_strength)
    p = _validate.check_p(p)
    route = _validate.check_method(method, p, max_iter, tol, auto=_auto_method(x))
    work = x.to(compute_dtype(x, xp_torch))  # float16/bfloat16 -> float32, else unchanged (no copy)
    last = ax == x.ndim - 1
    moved = work if last else work.movedim(ax, -1)
    n = moved.shape[-1]
    rows = moved if moved.ndim == 2 else moved.reshape(moved.numel() // n, n)
    q = conjugate_exponent(p)
    if route == "pav" and rows.device.type != "cpu":
        # The Numba PAV runs on host memory: an explicit (differentiable) round trip.
        y_rows = soft_rows(kind, rows.to("cpu"), k, lam, p, q, route, max_iter, tol).to(x.device)
    else:
        y_rows = soft_rows(kind, rows, k, lam, p, q, route, max_iter, tol)
    y = y_rows if moved.ndim == 2 else y_rows.reshape(moved.shape)
    y = y if last else y.movedim(-1, ax)
    return y.to(x.dtype)


def soft_topk_mask(
    x: torch.Tensor, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> torch.Tensor:
    """Sparse soft top-k mask along `axis` (see `topk_core.soft_topk_mask`).

    Parameters
    ----------
    x : torch.Tensor
        Real floating tensor of any shape, on any device (float16/bfloat16
        computed in float32).
    k : int
        Number of entries to select, ``1 <= k <= x.shape[axis]``.
    regularization_strength : float, default 0.1
        ``l > 0``; smaller is closer to the hard mask, larger is smoother.
    p : float, default 4/3
        Exponent ``p > 1`` of the regularizer (4/3: C^1; 2: piecewise linear).
    axis : int, default -1
        Axis along which to select.
    method : {"auto", "pav", "threshold", "dykstra"}, default "auto"
        Solver, passed to the core: ``"pav"`` (exact, ``p <= 8``, Numba, host memory),
        ``"threshold"`` (exact, on the tensor's device), ``"dykstra"``
        (approximate, ``p = 2``, on the tensor's device); ``"auto"`` is
        ``"pav"`` for CPU tensors and for CUDA calls of at most 2^21
        entries (a copy to the host and back), ``"threshold"`` otherwise and
        for ``p > 8`` (where PAV is not exact).
    max_iter, tol : int, float or None
        Controls of the iterative methods (``"threshold"``, ``"dykstra"``);
        must be None for ``"pav"`` and ``"auto"``.  Stopped by `max_iter`
        before their tolerance is met, eager calls warn
        `topk_core.ThresholdNotConverged` or `topk_core.DykstraNotConverged`
        (compiled ones cannot read their arrays: no warning).

    Returns
    -------
    torch.Tensor
        Same shape, dtype and device as `x`; every row lies in the capped simplex.

    Raises
    ------
    TypeError, ValueError
        As `topk_numpy.soft_topk_mask` (raised before any computation); also
        TypeError when `x` is not a `torch.Tensor`.
    NotImplementedError
        For ``p != 2``: derivatives of order three and higher, and second-order ones by forward mode over
        forward mode (``jacfwd`` of ``jacfwd``).

    Examples
    --------
    >>> import torch
    >>> import topk_torch as tk
    >>> x = torch.tensor([[3.0, 1.0, 0.9, -2.0]], requires_grad=True)
    >>> y = tk.soft_topk_mask(x, k=2, p=2.0, regularization_strength=1.0)
    >>> y.detach()
    tensor([[1.0000, 0.5500, 0.4500, 0.0000]])
    >>> y[0, 1].backward()
    >>> x.grad
    tensor([[ 0.0000,  0.5000, -0.5000,  0.0000]])
    """
    return _soft_op("mask", x, k, regularization_strength, p, axis, method, max_iter, tol)


def soft_topk_mag(
    x: torch.Tensor, k: int, *, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    axis: int = -1, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> torch.Tensor:
    """Sparse soft top-k in magnitude along `axis` (see `topk_core.soft_topk_mag`).

    Parameters
    ----------
    x, k, regularization_strength, p, axis, method, max_iter, tol
        As in `soft_topk_mask`.

    Returns
    -------
    torch.Tensor
        Same shape, dtype and device as `x`: exact zeros outside a support,
        clear winners returned unchanged.

    Raises
    ------
    TypeError, ValueError, NotImplementedError
        As in `soft_topk_mask`.

    Examples
    --------
    >>> import torch
    >>> import topk_torch as tk
    >>> x = torch.tensor([0.1, -4.0, 3.0, 0.2])
    >>> tk.soft_topk_mag(x, k=2)
    tensor([ 0., -4.,  3.,  0.])
    >>> torch.func.grad(lambda x: tk.soft_topk_mag(x, k=2).sum())(x)
    tensor([0., 1., 1., 0.])
    """
    return _soft_op("mag", x, k, regularization_strength, p, axis, method, max_iter, tol)


@_support.compiled_from_the_floor
def _hard_op(x: Any, k: Any, axis: Any, magnitude: bool) -> torch.Tensor:
    x = _as_tensor(x)
    _validated(x, k, axis)
    if magnitude:
        # torch.where(keep, x, 0) inside the core: the derivative is the mask.
        return topk_core.hard_topk_mag(x, k, axis=axis, xp=xp_torch)
    mask = topk_core.hard_topk_mask(x, k, axis=axis, xp=xp_torch)
    # Attach the output to the graph with a zero derivative (like torch.sign).
    return torch.where(torch.zeros_like(mask, dtype=torch.bool), x, mask)


def hard_topk_mask(x: torch.Tensor, k: int, *, axis: int = -1) -> torch.Tensor:
    """Hard top-k mask, ties toward the lower index (see `topk_core.hard_topk_mask`).

    Its derivative is zero (the output stays attached to the graph).

    Examples
    --------
    >>> import torch
    >>> import topk_torch as tk
    >>> tk.hard_topk_mask(torch.tensor([1.0, 3.0, 3.0, 2.0]), k=2)
    tensor([0., 1., 1., 0.])
    """
    return _hard_op(x, k, axis, magnitude=False)


def hard_topk_mag(x: torch.Tensor, k: int, *, axis: int = -1) -> torch.Tensor:
    """Hard top-k in magnitude (see `topk_core.hard_topk_mag`).

    Its derivative is the hard mask of ``|x|`` (ties toward the lower index).

    Examples
    --------
    >>> import torch
    >>> import topk_torch as tk
    >>> x = torch.tensor([0.5, -3.0, 2.0, 1.0], requires_grad=True)
    >>> y = tk.hard_topk_mag(x, k=2)
    >>> y.detach()
    tensor([ 0., -3.,  2.,  0.])
    >>> torch.autograd.grad(y.sum(), x)[0]
    tensor([0., 1., 1., 0.])
    """
    return _hard_op(x, k, axis, magnitude=True)
