"""Segment sums over contiguous blocks: cumulative sum + take, never an n x n matrix."""

from __future__ import annotations

from typing import Any


def segment_sum(values: Any, block_start: Any, block_end: Any, xp: Any) -> Any:
    """Sum `values` over each entry's block `[block_start, block_end]` along the last axis.

    Parameters
    ----------
    values : (batch, n) array
    block_start, block_end : (batch, n) integer arrays
        First and last index (inclusive) of the contiguous block of every entry.

    Returns
    -------
    (batch, n) array: for every entry, the sum of `values` over its block.
    """
    # A zero column in front of the cumulative sum (rather than include_initial=True,
    # whose zeros lose the sharding of a vmapped axis in JAX 0.10).
    csum = xp.concat([xp.zeros_like(values[..., :1]), xp.cumulative_sum(values, axis=-1)], axis=-1)
    return xp.take_along_axis(csum, block_end + 1, axis=-1) - xp.take_along_axis(csum, block_start, axis=-1)


def safe_divide(num: Any, den: Any, xp: Any) -> Any:
    """`num / den` where `den > 0`, else 0; the guard keeps autodiff free of NaN."""
    positive = den > 0
    return xp.where(positive, num / xp.where(positive, den, xp.ones_like(den)), xp.zeros_like(num))
