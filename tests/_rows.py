"""Test rows of the kinds that stress the CPU kernels: one generator for every kernel's tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays


def rows_of_kind(rng: np.random.Generator, batch: int, n: int, kind: str, dtype) -> np.ndarray:
    """(batch, n) rows of `dtype`.

    Kinds: "normal"; "ties" (halves: ties and exact zeros); "spread" (rows
    scaled by e^u, u uniform in [-6, 6]: very different scales); "dominant"
    (one entry far above the rest); "offset" (keys near 1e3, large next to the
    strength); "uniform" (uniform in [-1, 1]).
    """
    x = rng.normal(size=(batch, n))
    if kind == "ties":
        x = np.round(x * 2) / 2
    elif kind == "spread":
        x = x * np.exp(rng.uniform(-6, 6, size=(batch, 1)))
    elif kind == "dominant":
        x[:, 0] = 1e4
    elif kind == "offset":
        x = 1e3 + x
    elif kind == "uniform":
        x = rng.uniform(-1, 1, size=(batch, n))
    elif kind != "normal":
        raise ValueError(f"unknown kind of rows: {kind!r}")
    return x.astype(dtype)


def spanning_row(seed: int, span: float, n: int, centre: float = 0.0) -> np.ndarray:
    """n float64 values +-10^u, u uniform in [centre - span, centre + span]: magnitudes spanning many orders."""
    rng = np.random.default_rng(seed)
    return 10.0 ** (centre + rng.uniform(-span, span, size=n)) * rng.choice([-1.0, 1.0], size=n)


def rows_lowered_from_one_scale(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    """(batch, n) rows: keys of one scale per row (0.5-2 times 10^c, c uniform in [-150, 150]), each lowered by
    up to 120 orders, random signs (`benchmarks/mag_entrywise.py`'s rows; `rows_spanning_many_orders` draws
    the same kind with hypothesis)."""
    centre = rng.uniform(-150.0, 150.0, size=(batch, 1))
    lowered = rng.uniform(0.0, 120.0, size=(batch, n))
    signs = rng.choice([-1.0, 1.0], size=(batch, n))
    return rng.uniform(0.5, 2.0, size=(batch, n)) * 10.0 ** (centre - lowered) * signs


def rows_spanning_many_orders(min_n: int, max_n: int) -> st.SearchStrategy:
    """Hypothesis rows whose magnitudes span many orders: keys of one scale (0.5-2 times 10^c,
    c in [-150, 150]), each lowered by up to 120 orders, with random signs."""
    return st.integers(min_n, max_n).flatmap(lambda n: st.tuples(
        arrays(np.float64, n, elements=st.floats(0.5, 2.0)),
        arrays(np.float64, n, elements=st.floats(0.0, 120.0)),
        arrays(np.bool_, n),
        st.floats(-150.0, 150.0),
    )).map(lambda t: t[0] * 10.0 ** (t[3] - t[1]) * np.where(t[2], -1.0, 1.0))


def rows_far_below_their_largest_key(rng: np.random.Generator, dtype: type, n: int, rows: int) -> tuple[np.ndarray, int]:
    """(rows, k): rows of a few huge keys (0 to 5) over small ones, the small ones 0-100% of the dtype's
    range below them, and a k from 1 to 7, so that the k-th place often lies among the small keys
    (`threshold._mag_deep_frames`).  Normal numbers only (XLA flushes subnormal ones)."""
    lo_e, hi_e = (-37.0, 38.0) if dtype == np.float32 else (-300.0, 307.0)
    out = np.empty((rows, n))
    for i in range(rows):
        e_big = rng.uniform((lo_e + hi_e) / 2, hi_e - 1)
        e_small = rng.uniform(lo_e + 2, e_big)
        big = np.arange(n) < rng.integers(0, 6)
        exps = np.where(big, e_big + rng.uniform(-1, 1, n), e_small + rng.uniform(-2, 2, n))
        out[i] = rng.choice([-1.0, 1.0], n) * 10.0 ** np.clip(exps, lo_e, hi_e - 0.01)
    return out.astype(dtype), int(rng.integers(1, 8))
