"""The Array-API namespace that the adapter hands to the core: `array_api_compat.torch`, leaner.

Three functions of `array_api_compat.torch` are replaced; everything else is
`array_api_compat.torch` itself (the module keeps its name, so the compat
helpers still recognize it as the torch namespace):

* `cumulative_sum` looks the namespace up again with
  `array_api_compat.array_namespace`, an `lru_cache`-wrapped function that
  `torch.compile` traces with a warning (and that costs time on every eager
  call); here it is `torch.cumsum` directly.
* `take_along_axis` is `torch.take_along_dim`, which (torch 2.13) wraps
  negative indices with four full-size integer temporaries per call; the
  core only gathers with non-negative indices, so here it is `torch.gather`
  (after broadcasting the other dimensions, as the standard requires).
* `concat` is `torch.concat`, for which `torch.func.vmap` has no batching
  rule (torch 2.13); here it is `torch.cat`, which has one.
"""

from __future__ import annotations

import types
from typing import Any

import array_api_compat.torch as _compat
import torch


def cumulative_sum(
    x: torch.Tensor, /, *, axis: int | None = None, dtype: Any = None, include_initial: bool = False
) -> torch.Tensor:
    """`array_api.cumulative_sum` on `torch.cumsum` (no namespace lookup)."""
    if axis is None:
        if x.ndim > 1:
            raise ValueError("axis must be specified in cumulative_sum for more than one dimension")
        axis = 0
    out = torch.cumsum(x, dim=axis, dtype=dtype)
    if include_initial:
        shape = list(out.shape)
        shape[axis] = 1
        out = torch.cat([out.new_zeros(shape), out], dim=axis)
    return out


def take_along_axis(x: torch.Tensor, indices: torch.Tensor, /, *, axis: int = -1) -> torch.Tensor:
    """`array_api.take_along_axis` for non-negative `indices`, on `torch.gather`."""
    if x.ndim != indices.ndim:
        raise ValueError(f"take_along_axis: x has {x.ndim} dimensions and indices {indices.ndim}")
    axis = axis % x.ndim
    x_shape, i_shape = list(x.shape), list(indices.shape)
    others = [a for i, a in enumerate(x_shape) if i != axis]
    i_others = [a for i, a in enumerate(i_shape) if i != axis]
    if others != i_others:
        common = list(torch.broadcast_shapes(tuple(others), tuple(i_others)))
        x = x.expand([*common[:axis], x_shape[axis], *common[axis:]])
        indices = indices.expand([*common[:axis], i_shape[axis], *common[axis:]])
    return torch.gather(x, axis, indices)


def concat(arrays: Any, /, *, axis: int | None = 0) -> torch.Tensor:
    """`array_api.concat` on `torch.cat` (which `torch.func.vmap` can batch)."""
    arrays = list(arrays)
    if axis is None:
        return torch.cat([a.reshape(-1) for a in arrays])
    return torch.cat(arrays, dim=axis)


xp = types.ModuleType(_compat.__name__, _compat.__doc__)
xp.__dict__.update({name: value for name, value in vars(_compat).items() if not name.startswith("__")})
xp.__array_namespace_info__ = _compat.__array_namespace_info__
xp.cumulative_sum = cumulative_sum
xp.take_along_axis = take_along_axis
xp.concat = concat
