"""Hard top-k operators for JAX, built on `jax.lax.top_k` (spec section 1).

`jax.lax.top_k` works on the last axis and returns tied values lower index
first, which is the library's tie rule.  It orders floats totally
(``-0.0 < +0.0``), so zeros are made positive before selecting: ``-0.0`` and
``+0.0`` then tie and the lower index wins, as in NumPy.  Rows containing NaN
give NaN rows (as in `topk_core.hard_topk_mask`).

Derivatives follow from the construction: the mask is built from integer
indices only (its derivative is 0) and the magnitude operator is
``where(keep, x, 0)`` (its derivative is the mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["hard_topk_rows"]


def hard_topk_rows(rows: jax.Array, k: int, magnitude: bool) -> jax.Array:
    """Hard top-k mask (``magnitude=False``) or magnitude operator of (batch, n) rows."""
    nan_rows = jnp.any(jnp.isnan(rows), axis=-1, keepdims=True)
    clean = jnp.where(nan_rows, jnp.zeros_like(rows), rows)
    keys = jnp.abs(clean) if magnitude else jnp.where(clean == 0, jnp.zeros_like(clean), clean)
    _, index = jax.lax.top_k(jax.lax.stop_gradient(keys), k)
    batch = jnp.arange(rows.shape[0])[:, None]
    keep = jnp.zeros(rows.shape, dtype=bool).at[batch, index].set(True)
    zeros = jnp.zeros_like(rows)
    out = jnp.where(keep, clean, zeros) if magnitude else jnp.where(keep, jnp.ones_like(rows), zeros)
    return jnp.where(nan_rows, jnp.full_like(rows, jnp.nan), out)
