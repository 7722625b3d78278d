"""The core's Triton kernels for short rows (`topk_core._triton_rows`) on torch tensors.

``method="threshold"`` on CUDA rows of at most `topk_core._triton_rows.MAX_N`
entries (``1 <= k < n``, default `max_iter` and `tol`) runs as one kernel
launch per call: the rows are solved in registers and the output and the
residuals written once.  Rows that the kernel hands back (a non-finite
entry, no convergence) are solved again by the Array-API threshold method,
which holds the library's NaN and infinity policy; finding them costs one
host read of the rows' status per call.

When the kernels are used is set by the environment variable
``SPARSE_TOPK_TORCH_TRITON``: ``auto`` (the default: CUDA tensors, where
Triton is installed), ``always`` (any device: with ``TRITON_INTERPRET=1``
Triton's interpreter runs them on CPU tensors, which is how the tests check
them) or ``never``.  A kernel that fails to compile or launch makes the
threshold method take its Array-API route for the rest of the process, with
a warning.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from types import ModuleType
from typing import Any

import numpy as np
import torch

from topk_core import MagResiduals, MaskResiduals
from topk_core._api import _AGNOSTIC

from . import _fused
from ._namespace import xp as xp_torch

ENVIRONMENT_VARIABLE = "SPARSE_TOPK_TORCH_TRITON"
MODES = ("auto", "always", "never")
_failures: list[str] = []


def triton_mode() -> str:
    """The mode that ``SPARSE_TOPK_TORCH_TRITON`` sets (``"auto"`` when unset)."""
    mode = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENVIRONMENT_VARIABLE} must be one of {MODES}, got {mode!r}")
    return mode


@functools.cache
def kernels() -> ModuleType | None:
    """`topk_core._triton_rows`, or None where Triton is not installed."""
    try:
        from topk_core import _triton_rows
    except ImportError:
        return None
    return _triton_rows


def usable(x: torch.Tensor, k: int, max_iter: Any, tol: Any) -> bool:
    """Whether the threshold method runs the Triton kernels on (batch, n) rows `x`."""
    mode = triton_mode()
    if _failures or mode == "never" or (mode == "auto" and x.device.type != "cuda"):
        return False
    if max_iter is not None or tol is not None or x.shape[0] == 0 or not 1 <= k < x.shape[-1]:
        return False
    module = kernels()
    return module is not None and x.shape[-1] <= module.MAX_N


def _launch(kind: str, x: torch.Tensor, k: int, lam: float, q: float, residuals: bool) -> tuple[torch.Tensor, ...]:
    """``(status, y, *residual arrays)`` from one launch of the kernel of `kind` (status: per row, -1 where
    the row is handed back, else its iterations; `topk_core._triton_rows`)."""
    module = kernels()
    batch, n = x.shape
    block, rows, warps = module.block_shape(n)
    params = torch.tensor([lam, q - 1.0], dtype=torch.float64, device=x.device)
    status = torch.empty(batch, dtype=torch.int8, device=x.device)
    y = torch.empty_like(x)
    gp = torch.empty_like(x) if residuals else y  # unused without residuals
    grid = ((batch + rows - 1) // rows,)
    # IEEE arithmetic as on a GPU: an overflow or a division by zero in an extreme row gives inf or
    # NaN, which the kernel's checks hand back; Triton's interpreter (NumPy) would warn instead.
    quiet = np.errstate(all="ignore")
    meta = {"BLOCK": block, "ROWS": rows, "MODE": module.exponent_mode(q), "RESIDUALS": residuals,
            "MAX_ITER": module.MAX_ITER, "num_warps": warps}
    if kind == "mask":
        with quiet:
            module.mask_rows_kernel[grid](x, params, y, gp, status, batch, n, k, **meta)
        return (status, y, gp) if residuals else (status, y)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device) if residuals else status
    offset = x.new_empty((batch, 1)) if residuals else y
    with quiet:
        module.mag_rows_kernel[grid](x, params, y, gp, codes, offset, status, batch, n, k, **meta)
    return (status, y, gp, codes, offset) if residuals else (status, y)


# The residual types; their first four fields (permutation and blocks) are None in the kernels'
# layout, the arrays follow (g'; g', codes, offset).
_RESIDUALS = {"mask": MaskResiduals, "mag": MagResiduals}
_ARRAYS = slice(4, None)


def solve(kind: str, x: torch.Tensor, k: int, lam: float, q: float, residuals: bool) -> tuple[Any, Any] | None:
    """``(y, residuals or None)`` of operator `kind` on rows `x` by the kernels; None if they cannot run."""
    x = x.detach().contiguous()
    try:
        # Triton launches on the current CUDA device: make it the rows' (a no-op elsewhere).
        with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
            status, y, *arrays = _launch(kind, x, k, lam, q, residuals)
    except Exception as err:  # a compiler or driver that cannot run the kernel: the Array-API route
        _failures.append(f"{type(err).__name__}: {err}")
        warnings.warn(
            f"sparse-topk: the Triton kernel of the threshold method failed ({_failures[-1][:200]}); the "
            f"method runs its Array-API route for the rest of this process (set {ENVIRONMENT_VARIABLE}=never "
            "to skip it)", RuntimeWarning, stacklevel=3,
        )
        return None
    handed_back = torch.nonzero(status < 0).flatten()
    if handed_back.numel():
        # Rows with non-finite entries, or not converged: the Array-API method, whose policy holds.
        rows = x.index_select(0, handed_back)
        y_rows, res_rows = _AGNOSTIC["threshold", kind](
            rows, k, lam, q, xp_torch, **_fused.solver_hooks(rows, "threshold")
        )
        y.index_copy_(0, handed_back, y_rows)
        if residuals:
            for array, field in zip(arrays, res_rows[_ARRAYS], strict=True):
                array.index_copy_(0, handed_back, field.to(array.dtype))
    return y, (_RESIDUALS[kind](None, None, None, None, *arrays) if residuals else None)
