"""Helpers of the JAX adapter tests.

The inputs and the operator lookup shared by the JAX test modules (the
closed-form Jacobian oracles live in `tests/_oracles.py`).
"""

from __future__ import annotations

import numpy as np

import topk_jax as tk


def soft(op: str, lib=tk):
    return getattr(lib, f"soft_topk_{op}")


def rows(seed: int, shape: tuple[int, ...], scale: float = 1.5) -> np.ndarray:
    """Distinct random values, with a tie planted in the first row."""
    x = np.random.default_rng(seed).normal(size=shape) * scale
    flat = x.reshape(-1, shape[-1])
    if shape[-1] > 2:
        flat[0, 2] = flat[0, 1]
    return x
