"""Building blocks on the sparse soft top-k operators: pruning, a mixture-of-experts router, a top-k loss.

The JAX counterparts of `topk_torch.nn`, with the same semantics and numbers,
as pure functions on arrays and parameter pytrees.  Everything takes the
operator keywords of `topk_jax.soft_topk_mag` / `topk_jax.soft_topk_mask`
(`regularization_strength`, `p`, `method`, `max_iter`, `tol`); ``docs/applications.md``
explains the blocks with runnable examples.

* Pruning: `prune_array` and `topk_prune` (on the leaves of a pytree chosen
  by a predicate) keep the ``k = round((1 - sparsity) * size)`` entries of
  largest magnitude softly; `finalize_pruning` gives the exactly k-sparse
  leaves for deployment.
* Mixture of experts: `topk_gates` (``soft_topk_mag(softmax(logits), k)``,
  exact zeros), `topk_router`, `moe_dispatch` (gathers the tokens of each
  expert, runs only those, scatters back; with a fixed `capacity` under
  `jax.jit`), `init_moe`, `moe_layer`, `mlp_expert` and `routing_stats`.
* `topk_loss`: a differentiable top-k classification loss.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import topk_jax as _tk
from topk_core import _applications as _checks
from topk_core import _routing
from topk_core._api import DEFAULT_P, DEFAULT_STRENGTH

__all__ = [
    "RoutingStats",
    "finalize_pruning",
    "init_moe",
    "mlp_expert",
    "moe_dispatch",
    "moe_layer",
    "num_kept",
    "prune_array",
    "routing_stats",
    "topk_gates",
    "topk_loss",
    "topk_prune",
    "topk_router",
]

Predicate = Callable[[tuple[Any, ...], Any], bool]


def _straight_through(x: jax.Array, y: jax.Array) -> jax.Array:
    """`y` in the forward pass, the identity's derivative (exact: ``x + (y - x) == y``)."""
    return x + jax.lax.stop_gradient(y - x)


# --------------------------------------------------------------------------- pruning


def _groups(w: jax.Array, per_row: bool, row_axis: int) -> jax.Array:
    if not per_row:
        return jnp.reshape(w, (1, -1))
    return jnp.reshape(jnp.moveaxis(w, row_axis, 0), (w.shape[row_axis], -1))


def _ungroup(rows: jax.Array, w: jax.Array, per_row: bool, row_axis: int) -> jax.Array:
    if not per_row:
        return jnp.reshape(rows, w.shape)
    moved_shape = jnp.moveaxis(w, row_axis, 0).shape
    return jnp.moveaxis(jnp.reshape(rows, moved_shape), 0, row_axis)


def num_kept(w: Any, sparsity: float, *, per_row: bool = False, row_axis: int = 0) -> int:
    """Non-zeros of the finalized `w`: ``round((1 - sparsity) * group size)`` per group, times the groups.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from topk_jax.nn import num_kept
    >>> num_kept(jnp.ones((4, 10)), 0.9), num_kept(jnp.ones((4, 10)), 0.9, per_row=True)
    (4, 4)
    """
    groups, size = _checks.group_sizes(jnp.shape(w), per_row, row_axis)
    return groups * _checks.kept_count(sparsity, size)


def prune_array(
    w: Any, sparsity: float, *, per_row: bool = False, row_axis: int = 0, hard: bool = False,
    regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P, method: str = "auto",
    max_iter: int | None = None, tol: float | None = None,
) -> jax.Array:
    """``soft_topk_mag(w, k)`` over the whole array, or over every slice along `row_axis` (``per_row=True``).

    ``k = round((1 - sparsity) * n)`` with ``n`` the size of the array or of
    one slice.  ``hard=True``: the hard magnitude top-k with the identity's
    derivative (straight-through).  The same map as `topk_torch.nn.TopkPruning`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from topk_jax.nn import prune_array
    >>> prune_array(jnp.array([[0.1, -4.0], [3.0, 0.2]]), 0.5)
    Array([[ 0., -4.],
           [ 3.,  0.]], dtype=float32)
    """
    w = jnp.asarray(w)
    size = _checks.group_sizes(w.shape, per_row, row_axis)[1]
    k = _checks.kept_count(sparsity, size)
    if w.size == 0:  # nothing to prune (as topk_torch.nn.TopkPruning)
        return w
    rows = _groups(w, per_row, row_axis)
    if hard:
        out = _straight_through(rows, _tk.hard_topk_mag(jax.lax.stop_gradient(rows), k))
    else:
        out = _tk.soft_topk_mag(rows, k, **_checks.soft_keywords(regularization_strength, p, method, max_iter, tol))
    return _ungroup(out, w, per_row, row_axis)


def _is_weight(path: tuple[Any, ...], leaf: Any) -> bool:
    """Floating leaves of at least two dimensions (integer ones, e.g. a step counter or an embedding's
    indices kept in the tree, were picked and failed on their dtype)."""
    del path
    return jnp.ndim(leaf) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def topk_prune(
    params: Any, sparsity: float, *, predicate: Predicate | None = None, per_row: bool = False, row_axis: int = 0,
    hard: bool = False, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> Any:
    """`prune_array` applied to the leaves of the pytree `params` selected by `predicate`.

    Call it inside the loss, on the dense parameters being trained:
    ``loss(topk_prune(params, 0.9), batch)``; the gradient flows back to the
    dense leaves through the soft operator.

    Parameters
    ----------
    params : pytree
        Parameters, e.g. a dict of arrays.
    sparsity : float
        Fraction of entries set to zero, ``0 <= sparsity < 1``.
    predicate : callable, optional
        ``predicate(path, leaf) -> bool`` (the path as in
        `jax.tree_util.tree_map_with_path`); by default the floating leaves
        with at least two dimensions (weights, not biases).
    per_row, row_axis, hard, regularization_strength, p, method, max_iter, tol
        As in `prune_array`.

    Returns
    -------
    pytree
        `params` with the selected leaves pruned, the others unchanged.
    """
    predicate = _is_weight if predicate is None else predicate
    keywords = _checks.soft_keywords(regularization_strength, p, method, max_iter, tol)

    def one(path: tuple[Any, ...], leaf: Any) -> Any:
        if not predicate(path, leaf):
            return leaf
        return prune_array(leaf, sparsity, per_row=per_row, row_axis=row_axis, hard=hard, **keywords)

    return jax.tree_util.tree_map_with_path(one, params)


def finalize_pruning(
    params: Any, sparsity: float, *, predicate: Predicate | None = None, per_row: bool = False, row_axis: int = 0,
    hard: bool = False, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
    method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> Any:
    """The exactly k-sparse parameters for deployment: the hard magnitude top-k of ``topk_prune(params, ...)``.

    Same arguments as `topk_prune`; each selected leaf keeps `num_kept`
    non-zeros (when its soft output has that many), the others are unchanged.
    The same numbers as `topk_torch.nn.finalize_pruning`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from topk_jax.nn import finalize_pruning
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 16)), "b": jnp.ones(8)}
    >>> final = finalize_pruning(params, 0.9, regularization_strength=0.01)
    >>> int((final["w"] != 0).sum()), int((final["b"] != 0).sum())
    (13, 8)
    """
    predicate = _is_weight if predicate is None else predicate
    keywords = _checks.soft_keywords(regularization_strength, p, method, max_iter, tol)

    def one(path: tuple[Any, ...], leaf: Any) -> Any:
        if not predicate(path, leaf):
            return leaf
        soft = jax.lax.stop_gradient(
            prune_array(leaf, sparsity, per_row=per_row, row_axis=row_axis, hard=hard, **keywords)
        )
        k = _checks.kept_count(sparsity, _checks.group_sizes(soft.shape, per_row, row_axis)[1])
        if soft.size == 0:
            return soft
        return _ungroup(_tk.hard_topk_mag(_groups(soft, per_row, row_axis), k), soft, per_row, row_axis)

    return jax.tree_util.tree_map_with_path(one, params)


# --------------------------------------------------------------------------- mixture of experts


def topk_gates(
    logits: Any, k: int, *, hard: bool = False, regularization_strength: float = DEFAULT_STRENGTH,
    p: float = DEFAULT_P, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> jax.Array:
    """Per-token expert gates ``soft_topk_mag(softmax(logits), k)`` along the last axis.

    Exact zeros outside a support of at least `k` experts per token; clear
    winners keep their softmax probability.  ``hard=True``: the softmax
    probabilities of the `k` largest logits.  See `topk_torch.nn.topk_gates`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from topk_jax.nn import topk_gates
    >>> gates = topk_gates(jnp.array([[2.0, 1.0, -1.0, 0.5], [1.0, 1.0, 0.8, -1.0]]), k=1)
    >>> gates.round(4)
    Array([[0.6095, 0.    , 0.    , 0.    ],
           [0.1954, 0.1954, 0.    , 0.    ]], dtype=float32)
    """
    probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    if hard:
        return _tk.hard_topk_mag(probs, k)
    return _tk.soft_topk_mag(probs, k, **_checks.soft_keywords(regularization_strength, p, method, max_iter, tol))


def topk_router(
    x: Any, weight: Any, k: int, *, bias: Any = None, hard: bool = False,
    regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P, method: str = "auto",
    max_iter: int | None = None, tol: float | None = None,
) -> jax.Array:
    """Gates ``topk_gates(x @ weight + bias, k)``; `weight` has shape ``(in_features, num_experts)``."""
    logits = jnp.asarray(x) @ weight
    if bias is not None:
        logits = logits + bias
    return topk_gates(logits, k, hard=hard, **_checks.soft_keywords(regularization_strength, p, method, max_iter, tol))


class RoutingStats(NamedTuple):
    """Where the tokens went, from the gates of `topk_gates`."""

    experts_per_token: jax.Array
    """(tokens,) int: number of experts with a non-zero gate for each token."""
    load: jax.Array
    """(experts,) int: number of tokens sent to each expert."""
    gate_mass: jax.Array
    """(experts,) float: sum of the gates of each expert."""

    # Concrete counts are summarized on the host in float64 (as `topk_torch.nn.RoutingStats` does) and give
    # Python floats; traced ones (inside `jax.jit`, e.g. to log from a train step) give a traced scalar of
    # JAX's default float dtype.
    @property
    def mean_experts_per_token(self) -> float | jax.Array:
        """Mean number of experts per token (NaN when there are no tokens); a traced scalar under `jax.jit`."""
        return _summary(_routing.mean_experts_per_token, self.experts_per_token)

    @property
    def load_imbalance(self) -> float | jax.Array:
        """Maximum load over mean load (1 is perfectly balanced; NaN when no token was routed); a traced
        scalar under `jax.jit`."""
        return _summary(_routing.load_imbalance, self.load)


def _summary(summarize: Callable[[Any], Any], counts: jax.Array) -> float | jax.Array:
    if isinstance(counts, jax.core.Tracer):
        return summarize(counts.astype(jnp.result_type(float)))
    return float(summarize(np.asarray(counts, dtype=np.float64)))


def routing_stats(gates: Any) -> RoutingStats:
    """Experts per token and load per expert of `gates` (tokens on the leading axes, experts last).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from topk_jax.nn import routing_stats
    >>> stats = routing_stats(jnp.array([[0.5, 0.0, 0.2], [0.0, 0.0, 0.9]]))
    >>> stats.experts_per_token.tolist(), stats.load.tolist()
    ([2, 1], [1, 0, 2])
    >>> stats.mean_experts_per_token, stats.load_imbalance
    (1.5, 2.0)
    """
    gates = jax.lax.stop_gradient(jnp.asarray(gates))
    if gates.ndim == 0:
        raise ValueError("`gates` must have at least one dimension (experts last); got a 0-d array")
    # Explicit sizes: `-1` is ambiguous when there are no experts.
    flat = jnp.reshape(gates, (math.prod(gates.shape[:-1]), gates.shape[-1]))
    nonzero = flat != 0
    return RoutingStats(nonzero.sum(axis=1), nonzero.sum(axis=0), flat.sum(axis=0))


def _bucket(count: int, tokens: int) -> int:
    """Rows an expert processes for `count` routed tokens: the next power of two (at least 8), at most `tokens`."""
    return min(tokens, max(8, 1 << (count - 1).bit_length()))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _accumulate(
    expert_fn: Callable[[Any, jax.Array], jax.Array], out: jax.Array, params: Any, x: jax.Array, column: jax.Array,
    size: int,
) -> jax.Array:
    """``out`` plus one expert's gated outputs on (at most `size` of) its routed tokens, gathered and scattered."""
    tokens = jnp.nonzero(column, size=size, fill_value=0)[0]
    kept = jnp.arange(size) < jnp.count_nonzero(column)
    weights = jnp.where(kept, column[tokens], 0)
    # The padding (rows of token 0) selected away, not multiplied by its zero weight: an expert output
    # that overflows on token 0 made 0 * inf = NaN in token 0's output although no row of it was routed.
    gated = jnp.where(kept[:, None], expert_fn(params, x[tokens]) * weights[:, None], 0)
    return out.at[tokens].add(gated.astype(out.dtype))


def moe_dispatch(
    x: Any, gates: Any, expert_fn: Callable[[Any, jax.Array], jax.Array], expert_params: Sequence[Any], *,
    capacity: int | None = None,
) -> jax.Array:
    """Sparse mixture-of-experts combination ``y_t = sum_e gates[t, e] * expert_fn(expert_params[e], x_t)``.

    Each expert runs only on the tokens with a non-zero gate: they are
    gathered, passed through the expert, weighted by their gates and
    scattered back (``.at[].add``), in one jitted step per expert.

    * ``capacity=None``: every routed token is processed.  The token sets
      have data-dependent sizes, so the gates must be concrete (eager mode;
      `jax.grad` and `jax.vjp` of an eager function work, `jax.jit` does
      not).  An expert with ``n`` tokens processes a buffer of
      ``min(tokens, max(8, next power of two >= n))`` rows, the padding
      weighted by exact zeros, so that the compiled steps are reused across
      calls instead of compiled for every ``n``.  Experts with no token are
      skipped.
    * ``capacity=c``: every expert processes a fixed buffer of ``c`` rows
      (`jax.numpy.nonzero` with ``size=c``), which works under `jax.jit`.  An
      expert with more than ``c`` tokens processes the first ``c`` in token
      order and drops the others (as in Switch Transformers); with
      ``c >= tokens`` nothing is dropped and the result is that of
      ``capacity=None``.

    Parameters
    ----------
    x : array
        Tokens, shape ``(tokens, in_features)``.
    gates : array
        Shape ``(tokens, num_experts)``, e.g. from `topk_gates`.
    expert_fn : callable
        ``expert_fn(params, tokens) -> (n, out_features)``, e.g. `mlp_expert`;
        hashable (a module-level function), it is a static argument of `jax.jit`.
    expert_params : sequence of pytrees
        One parameter pytree per expert.
    capacity : int, optional
        Rows per expert (see above).

    Returns
    -------
    jax.Array
        Shape ``(tokens, out_features)``.

    Raises
    ------
    ValueError
        For mismatched shapes, a `capacity` that is not a positive int, or
        ``capacity=None`` with traced gates (under `jax.jit`).
    """
    x = jnp.asarray(x)
    gates = jnp.asarray(gates)
    if x.ndim != 2 or gates.ndim != 2 or gates.shape[0] != x.shape[0] or gates.shape[1] != len(expert_params):
        raise ValueError(
            f"`x` must be (tokens, features) and `gates` (tokens, {len(expert_params)} experts); "
            f"got x.shape = {x.shape}, gates.shape = {gates.shape}"
        )
    capacity = _checks.check_capacity(capacity)
    probe = jax.eval_shape(expert_fn, expert_params[0], jax.ShapeDtypeStruct((1, x.shape[1]), x.dtype))
    out = jnp.zeros((x.shape[0], probe.shape[-1]), jnp.result_type(probe.dtype, gates.dtype))
    if x.shape[0] == 0:  # no token (a buffer of `capacity` rows gathered token 0, which is not there)
        return out
    if capacity is None:
        try:
            counts = [int(c) for c in jnp.count_nonzero(gates, axis=0)]
        except jax.errors.ConcretizationTypeError:
            raise ValueError(
                "moe_dispatch with capacity=None needs concrete gates (the number of tokens of an expert sets "
                "array shapes); under jax.jit pass a fixed `capacity`"
            ) from None
    for e, params in enumerate(expert_params):
        if capacity is None:
            if counts[e] == 0:
                continue
            size = _bucket(counts[e], x.shape[0])
        else:
            size = capacity
        out = _accumulate(expert_fn, out, params, x, gates[:, e], size)
    return out


def mlp_expert(params: Any, x: jax.Array) -> jax.Array:
    """The default expert ``Linear -> GELU (exact, erf) -> Linear``; weights stored ``(in, out)``.

    `params` is a dict with ``w1 (in, hidden)``, ``b1 (hidden,)``,
    ``w2 (hidden, out)``, ``b2 (out,)``: the experts of `topk_torch.nn.MoE`
    with their weights transposed.
    """
    h = jax.nn.gelu(x @ params["w1"] + params["b1"], approximate=False)
    return h @ params["w2"] + params["b2"]


def init_moe(
    key: jax.Array, in_features: int, num_experts: int, hidden_features: int = 64, out_features: int | None = None,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Parameters of `moe_layer`: ``{"router": {"weight", "bias"}, "experts": [mlp_expert params, ...]}``.

    Uniform initialization in ``±1/sqrt(fan_in)``, like `torch.nn.Linear`.
    """
    out_features = in_features if out_features is None else out_features

    def uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0  # (as torch.nn.Linear; 1 / 0 before)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    keys = jax.random.split(key, 2 + 4 * num_experts)
    router = {
        "weight": uniform(keys[0], (in_features, num_experts), in_features),
        "bias": uniform(keys[1], (num_experts,), in_features),
    }
    experts = []
    for e in range(num_experts):
        k1, k2, k3, k4 = keys[2 + 4 * e: 6 + 4 * e]
        experts.append({
            "w1": uniform(k1, (in_features, hidden_features), in_features),
            "b1": uniform(k2, (hidden_features,), in_features),
            "w2": uniform(k3, (hidden_features, out_features), hidden_features),
            "b2": uniform(k4, (out_features,), hidden_features),
        })
    return {"router": router, "experts": experts}


def moe_layer(
    params: dict[str, Any], x: Any, k: int, *, expert_fn: Callable[[Any, jax.Array], jax.Array] = mlp_expert,
    capacity: int | None = None, hard: bool = False, regularization_strength: float = DEFAULT_STRENGTH,
    p: float = DEFAULT_P, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """A sparse mixture-of-experts layer: `topk_router`, then `moe_dispatch`; the JAX `topk_torch.nn.MoE`.

    Tokens are all the leading axes of `x`.  Returns ``(y, gates)`` with
    shapes ``(*x.shape[:-1], out_features)`` and ``(*x.shape[:-1], num_experts)``.

    Examples
    --------
    >>> import jax
    >>> from topk_jax.nn import init_moe, moe_layer, routing_stats
    >>> params = init_moe(jax.random.key(0), 16, num_experts=4, hidden_features=32)
    >>> y, gates = moe_layer(params, jax.random.normal(jax.random.key(1), (10, 16)), k=2)
    >>> y.shape, gates.shape
    ((10, 16), (10, 4))
    >>> bool((routing_stats(gates).experts_per_token >= 2).all())
    True
    """
    x = jnp.asarray(x)
    lead = x.shape[:-1]
    tokens = jnp.reshape(x, (-1, x.shape[-1]))
    router = params["router"]
    gates = topk_router(
        tokens, router["weight"], k, bias=router.get("bias"), hard=hard,
        **_checks.soft_keywords(regularization_strength, p, method, max_iter, tol),
    )
    y = moe_dispatch(tokens, gates, expert_fn, params["experts"], capacity=capacity)
    return jnp.reshape(y, (*lead, y.shape[-1])), jnp.reshape(gates, (*lead, gates.shape[-1]))


# --------------------------------------------------------------------------- top-k loss


def _outside_classes(labels: jax.Array, classes: int) -> jax.Array:
    """Where `labels` lie outside ``[0, classes)``; raises TypeError for labels that are no integers and, where
    they can be read (not under `jax.jit`), ValueError for labels outside the classes.  Under `jax.jit` those
    samples' losses are NaN: a label of -1 read class `classes - 1` (JAX wraps negative indices) and one
    of `classes` gave NaN silently, where `topk_torch.nn.topk_loss` raises."""
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"`labels` must be integer class indices; got dtype {labels.dtype}")
    outside = (labels < 0) | (labels >= classes)
    try:
        found = bool(jnp.any(outside))
    except jax.errors.ConcretizationTypeError:  # traced: NaN losses mark them
        found = False
    if found:
        raise ValueError(f"`labels` must be class indices in [0, {classes}); got {labels[outside][:5].tolist()}")
    return outside


def topk_loss(
    scores: Any, labels: Any, k: int | Sequence[int] = 5, *, k_weights: Sequence[float] | None = None,
    ce_weight: float = 0.5, eps: float = 1e-2, reduction: str = "mean",
    regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P, method: str = "auto",
    max_iter: int | None = None, tol: float | None = None,
) -> jax.Array:
    """Differentiable top-k classification loss on the sparse soft top-k mask, mixed with cross-entropy.

    .. code-block:: text

        P(s, y) = sum_j pi_j * soft_topk_mask(s, k_j)_y
        loss    = ce_weight * CE(s, y) - (1 - ce_weight) * log(eps + (1 - eps) * P(s, y))

    Same arguments, formula and numbers as `topk_torch.nn.topk_loss` (see
    there for the explanation); `labels` are integer class indices of shape
    ``scores.shape[:-1]``, in ``[0, classes)`` (else ValueError; under `jax.jit`, which cannot raise on
    values, those samples' losses are NaN).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from topk_jax.nn import topk_loss
    >>> scores = jnp.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    >>> jax.grad(topk_loss)(scores, jnp.array([1, 0]), 2).shape
    (2, 4)
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"`reduction` must be 'mean', 'sum' or 'none'; got {reduction!r}")
    scores = jnp.asarray(scores)
    labels = jnp.asarray(labels)
    if labels.shape != scores.shape[:-1]:
        raise ValueError(f"`labels` must have shape scores.shape[:-1] = {scores.shape[:-1]}; got {labels.shape}")
    mixture = _checks.loss_mixture(k, k_weights, scores.shape[-1])
    ce_weight = _checks.check_ce_weight(ce_weight)
    eps = _checks.check_eps(eps)
    keywords = _checks.soft_keywords(regularization_strength, p, method, max_iter, tol)
    outside = _outside_classes(labels, scores.shape[-1])
    index = labels[..., None].astype(jnp.int32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), index, axis=-1)[..., 0]
    membership = sum(
        weight * jnp.take_along_axis(_tk.soft_topk_mask(scores, kk, **keywords), index, axis=-1)[..., 0]
        for kk, weight in mixture
    )
    loss = ce_weight * ce - (1.0 - ce_weight) * jnp.log(eps + (1.0 - eps) * membership)
    loss = jnp.where(outside, jnp.nan, loss)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
