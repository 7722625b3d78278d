"""Numba kernels: the CPU fast paths of the isotonic step (spec section 4) and of the Jacobian products."""

from . import cache  # noqa: F401  (first: the kernels below are cached through its locators)
from .kernels import pav_rows, topk_rows_forward
from .select import topk_rows_select

__all__ = ["pav_rows", "topk_rows_forward", "topk_rows_select"]
