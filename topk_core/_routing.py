"""Summaries of a router's counts, for `routing_stats` of both adapters (`topk_torch.nn`, `topk_jax.nn`).

Written once against the Array API: the adapters pass float counts (float64 on
the host, or JAX's default float dtype under `jax.jit`) and turn the 0-d
results into Python floats where the counts are concrete.
"""

from __future__ import annotations

from typing import Any

from ._compat import namespace_of


def mean_experts_per_token(experts_per_token: Any) -> Any:
    """Mean of the (tokens,) float counts of experts per token; NaN when there are no tokens.

    Examples
    --------
    >>> import numpy as np
    >>> float(mean_experts_per_token(np.array([2.0, 1.0])))
    1.5
    """
    xp = namespace_of(experts_per_token)
    if experts_per_token.shape[0] == 0:  # (static: the mean of nothing warns or raises)
        return xp.asarray(float("nan"), dtype=experts_per_token.dtype)
    return xp.mean(experts_per_token)


def load_imbalance(load: Any) -> Any:
    """Largest over mean of the (experts,) float loads (1 is perfectly balanced); NaN when no token was
    routed (no expert, or every load 0).

    Examples
    --------
    >>> import numpy as np
    >>> float(load_imbalance(np.array([1.0, 0.0, 2.0])))
    2.0
    """
    xp = namespace_of(load)
    if load.shape[0] == 0:
        return xp.asarray(float("nan"), dtype=load.dtype)
    mean = xp.mean(load)
    routed = mean > 0  # (loads are counts: never negative)
    # Both branches of `where` are computed: divide by 1 where nothing was routed, not by 0.
    ratio = xp.max(load) / xp.where(routed, mean, xp.ones_like(mean))
    return xp.where(routed, ratio, xp.full_like(mean, float("nan")))
