"""Argument checks of the application building blocks (`topk_torch.nn`, `topk_jax.nn`).

Pure Python, shared by both adapters so that they accept and reject the same
arguments with the same messages.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from . import _validate


def check_sparsity(sparsity: Any) -> float:
    """Return `sparsity` as a float after checking ``0 <= sparsity < 1``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"`sparsity` must be a real number in [0, 1); got {sparsity!r} of type {type(sparsity).__name__}")
    value = float(sparsity)
    # (Comparisons alone, which NaN and inf fail: not math.isfinite, which cannot take the symbolic float
    # that torch.compile makes of a sparsity changed between calls, a pruning schedule.)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1) (the fraction of entries set to zero); got {sparsity!r}")
    return value


def kept_count(sparsity: Any, n: int) -> int:
    """Number of entries kept among `n`: ``k = round((1 - sparsity) * n)``, which must be at least 1 (0 for an
    empty group, ``n = 0``, which the pruning functions return unchanged)."""
    value = check_sparsity(sparsity)
    if n == 0:
        return 0
    k = round((1.0 - value) * n)
    if k < 1:
        raise ValueError(
            f"`sparsity` = {sparsity!r} keeps round((1 - sparsity) * {n}) = 0 of {n} entries; "
            f"use a sparsity below {1.0 - 0.5 / n:.6g} for groups of {n} entries"
        )
    return k


def check_capacity(capacity: Any) -> int | None:
    """Return the rows per expert of a mixture-of-experts dispatch: None, or a positive int."""
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral)
                                 or capacity < 1):
        raise ValueError(f"`capacity` must be None or a positive int; got {capacity!r}")
    return None if capacity is None else int(capacity)


def soft_keywords(
    regularization_strength: Any, p: Any, method: Any, max_iter: Any, tol: Any,
) -> dict[str, Any]:
    """The soft operators' keywords of a building block, checked where it is built.

    The classes (`topk_torch.nn.TopkPruning`, `TopkRouter`, `MoE`) kept them unchecked until their first
    forward; the functions check them at every call, as the operators do again.
    """
    lam = _validate.check_strength(regularization_strength)
    p = _validate.check_p(p)
    _validate.check_method(method, p, max_iter, tol, auto="threshold")
    return {"regularization_strength": lam, "p": p, "method": method, "max_iter": max_iter, "tol": tol}


def group_sizes(shape: Sequence[int], per_row: bool, row_axis: Any) -> tuple[int, int]:
    """(number of pruning groups, entries per group) of a weight of `shape`: the whole weight, or each slice
    along `row_axis` (checked: an IndexError from deep inside the frameworks before); an empty weight has
    groups of 0 entries."""
    size = math.prod(shape)
    if not per_row:
        return 1, size
    rows = shape[_validate.check_axis(row_axis, len(shape), "row_axis")]
    return rows, size // rows if rows else 0


def check_ce_weight(ce_weight: Any) -> float:
    """Return `ce_weight` as a float in [0, 1]."""
    if isinstance(ce_weight, bool) or not isinstance(ce_weight, numbers.Real):
        raise TypeError(f"`ce_weight` must be a real number in [0, 1]; got {ce_weight!r}")
    value = float(ce_weight)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`ce_weight` must be in [0, 1]; got {ce_weight!r}")
    return value


def check_eps(eps: Any) -> float:
    """Return `eps` as a float in (0, 1)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"`eps` must be a real number in (0, 1); got {eps!r}")
    value = float(eps)
    if not 0.0 < value < 1.0:
        raise ValueError(f"`eps` must be in (0, 1); got {eps!r}")
    return value


def loss_mixture(k: Any, k_weights: Any, n: int) -> list[tuple[int, float]]:
    """The mixture ``[(k_j, pi_j)]`` of the top-k loss, weights normalized to sum to 1.

    `k` is an int or a sequence of distinct ints in [1, n]; `k_weights` is None
    (uniform) or a sequence of non-negative reals of the same length, not all 0.
    Terms of weight 0 are dropped.
    """
    ks = [k] if isinstance(k, numbers.Integral) and not isinstance(k, bool) else k
    if not isinstance(ks, Sequence) or len(ks) == 0:
        raise TypeError(f"`k` must be an int or a non-empty sequence of ints; got {k!r}")
    checked: list[int] = []
    for value in ks:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"`k` must contain Python ints with 1 <= k <= n = {n}; got {value!r}")
        if not 1 <= int(value) <= n:
            raise ValueError(f"`k` must contain ints with 1 <= k <= n = {n} (the number of classes); got {value}")
        checked.append(int(value))
    if len(set(checked)) != len(checked):
        raise ValueError(f"`k` must not repeat a value; got {k!r}")
    if k_weights is None:
        weights = [1.0] * len(checked)
    else:
        if not isinstance(k_weights, Sequence) or len(k_weights) != len(checked):
            raise ValueError(f"`k_weights` must be a sequence of {len(checked)} non-negative reals (one per k); got {k_weights!r}")
        weights = []
        for value in k_weights:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`k_weights` must contain finite non-negative reals; got {k_weights!r}")
            weights.append(float(value))
    total = sum(weights)
    if total <= 0.0:
        raise ValueError(f"`k_weights` must not be all zero; got {k_weights!r}")
    return [(kk, w / total) for kk, w in zip(checked, weights, strict=True) if w > 0.0]
