"""Small pure Array-API helpers shared by the threshold and Dykstra solvers.

Everything works on (batch, n) rows with per-row quantities kept as
(batch, 1) arrays, so that no Python loop over rows is ever needed.
"""

from __future__ import annotations

from typing import Any

from .._compat import default_int, device
from .residuals import with_gprime


def count(mask: Any, xp: Any) -> Any:
    """Number of true entries of every row, as a (batch, 1) array of the default integer dtype."""
    return xp.count_nonzero(mask, axis=-1, keepdims=True)


def positions(n: int, like: Any, xp: Any) -> Any:
    """(1, n) array ``0, 1, ..., n - 1`` of the default integer dtype, on the device of `like`.

    `xp.arange` without ``device=`` makes it on the namespace's default device
    (the host for torch), which a CUDA tensor cannot be combined with.
    """
    return xp.reshape(xp.arange(n, dtype=default_int(xp), device=device(like)), (1, n))


def all_true(cond: Any, xp: Any) -> bool | None:
    """`bool(all(cond))` where the value can be read, else None.

    Traced or lazy arrays (``jax.jit``, ...) cannot be read during tracing;
    the Array API standard says `__bool__` raises TypeError then.  The
    iterative solvers treat None as "not yet": they run their full iteration
    budget with fixed shapes, which keeps them traceable.
    """
    try:
        return bool(xp.all(cond))
    except TypeError:
        return None


def nan_rows_of(x: Any, xp: Any) -> tuple[Any, Any]:
    """Return `(clean, nan_rows)`: rows containing NaN replaced by zeros, and the (batch, 1) flags."""
    nan_rows = xp.any(xp.isnan(x), axis=-1, keepdims=True)
    return xp.where(nan_rows, xp.zeros_like(x), x), nan_rows


def poison(residuals: Any, nan_rows: Any, xp: Any) -> Any:
    """NaN derivatives on NaN rows (confined to those rows), as the PAV path does."""
    # A NaN g' is enough: the magnitude's products multiply every entry by g' or by its scale
    # (`jacobians`), never select it away.
    return with_gprime(residuals, xp.where(nan_rows, xp.nan, residuals.gprime))
