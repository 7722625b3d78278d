"""Hard top-k operators (the limit l -> 0, spec section 1), pure Array API.

Ties are broken toward the lower index, as a stable sort on `-x` does: the
k-th largest value is read from one sort, entries above it are kept, and tied
entries equal to it are kept in index order (a cumulative count) until k
entries are selected.  No scatter and no n x n matrix.
"""

from __future__ import annotations

from typing import Any

from .._compat import default_int


def hard_topk_mask_rows(keys: Any, k: int, xp: Any) -> Any:
    """Boolean (batch, n) mask of the k largest `keys` of every row (NaN-free input)."""
    kth = xp.sort(keys, axis=-1, descending=True)[:, k - 1 : k]
    above = keys > kth
    tied = keys == kth
    int_dtype = default_int(xp)
    room = k - xp.sum(xp.astype(above, int_dtype), axis=-1, keepdims=True)
    tie_rank = xp.cumulative_sum(xp.astype(tied, int_dtype), axis=-1)
    return above | (tied & (tie_rank <= room))
