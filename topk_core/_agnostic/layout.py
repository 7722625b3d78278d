"""Axis handling: move the operator's axis last and flatten the rest to (batch, n)."""

from __future__ import annotations

from typing import Any


def to_rows(x: Any, axis: int, xp: Any) -> tuple[Any, tuple[int, ...]]:
    """Return `x` as a (batch, n) array and the shape of `x` with `axis` moved last."""
    moved = xp.moveaxis(x, axis, -1) if axis != x.ndim - 1 else x
    n = moved.shape[-1]
    batch = 1
    for d in moved.shape[:-1]:
        batch *= d
    return xp.reshape(moved, (batch, n)), tuple(moved.shape)


def from_rows(rows: Any, moved_shape: tuple[int, ...], axis: int, xp: Any) -> Any:
    """Inverse of `to_rows`."""
    out = xp.reshape(rows, moved_shape)
    ndim = len(moved_shape)
    return xp.moveaxis(out, -1, axis) if axis != ndim - 1 else out
