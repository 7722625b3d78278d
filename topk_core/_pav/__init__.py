"""Numba PAV kernels: the CPU fast path of the isotonic step (spec section 4)."""

from .kernels import pav_rows, topk_rows_forward
from .select import topk_rows_select

__all__ = ["pav_rows", "topk_rows_forward", "topk_rows_select"]
