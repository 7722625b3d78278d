"""Slow, obviously-correct PAV for tests only (generic weights, Python lists).

Textbook pool-adjacent-violators on a stack of blocks; every block value is
re-solved from scratch by 200 bisection steps on the block equation in
float64, with no closed forms and no incremental sums, so it shares no logic
with the Numba kernels that it checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _g(u: float, lam: float, q: float) -> float:
    return math.copysign((abs(u) / lam) ** (q - 1.0), u) if u != 0.0 else 0.0


def _block_value(vals: Sequence[float], ws: Sequence[float], lam: float, q: float, is_mag: bool) -> float:
    wsum = sum(ws)

    def excess(gamma: float) -> float:  # decreasing in gamma
        rhs = gamma * wsum if is_mag else wsum
        return sum(_g(s - gamma, lam, q) for s in vals) - rhs

    hi = max(max(vals), 0.0) + 1.0
    step = lam + 1.0
    lo = min(vals) - step
    while excess(lo) < 0.0:
        step *= 2.0
        lo = min(vals) - step
    while excess(hi) > 0.0:
        hi += step
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def reference_isotonic(
    s: Sequence[float], w: Sequence[float], lam: float, p: float, is_mag: bool
) -> tuple[list[float], list[int]]:
    """Solve ``min_{v non-increasing} sum Q*(s - v) + sum w v`` (mask) or ``+ sum w v^2 / 2`` (mag).

    Returns the solution and, for every index, the id (first index) of its block.
    """
    q = p / (p - 1.0)
    blocks: list[list] = []  # [start, end (exclusive), value]
    for i in range(len(s)):
        blocks.append([i, i + 1, _block_value([s[i]], [w[i]], lam, q, is_mag)])
        while len(blocks) >= 2 and blocks[-2][2] < blocks[-1][2]:
            start, end = blocks[-2][0], blocks[-1][1]
            blocks.pop()
            blocks[-1] = [start, end, _block_value(s[start:end], w[start:end], lam, q, is_mag)]
    v: list[float] = []
    ids: list[int] = []
    for start, end, value in blocks:
        v.extend([value] * (end - start))
        ids.extend([start] * (end - start))
    return v, ids


def reference_soft_topk(x: Sequence[float], k: int, lam: float, p: float, is_mag: bool) -> list[float]:
    """One row of the soft top-k mask or magnitude operator, via reference PAV (spec section 4)."""
    q = p / (p - 1.0)
    n = len(x)
    keys = [abs(t) for t in x] if is_mag else list(x)
    order = sorted(range(n), key=lambda i: -keys[i])
    s = [keys[i] for i in order]
    w = [1.0 if i < k else 0.0 for i in range(n)]
    v, _ = reference_isotonic(s, w, lam, p, is_mag)
    out = [0.0] * n
    for pos, i in enumerate(order):
        r = s[pos] - v[pos]
        if is_mag:
            out[i] = math.copysign(_g(r, lam, q) + r, x[i]) if x[i] != 0.0 else 0.0
        else:
            out[i] = _g(r, lam, q)
    return out
