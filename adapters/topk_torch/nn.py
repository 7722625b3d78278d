"""Building blocks on the sparse soft top-k operators: pruning, a mixture-of-experts router, a top-k loss.

Everything here is a thin layer over `topk_torch.soft_topk_mag` and
`topk_torch.soft_topk_mask`, and takes their keywords (`regularization_strength`,
`p`, `method`, `max_iter`, `tol`).  `topk_jax.nn` has the same blocks with the
same semantics and numbers; ``docs/applications.md`` explains them with
runnable examples.

* Pruning: `TopkPruning`, a parametrization for
  `torch.nn.utils.parametrize.register_parametrization` that keeps the
  ``k = round((1 - sparsity) * numel)`` entries of largest magnitude (of the
  whole tensor, or of every output row), and `finalize_pruning`, which bakes
  an exactly k-sparse weight into the module.
* Mixture of experts: `topk_gates` (``soft_topk_mag(softmax(logits), k)``,
  exact zeros), `TopkRouter`, `moe_dispatch` (gathers the tokens of each
  expert, runs only those, scatters back), `MoE` and `routing_stats`.
* `topk_loss`: a differentiable top-k classification loss.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

import topk_torch as _tk
from topk_core import _applications as _checks
from topk_core import _routing, _validate
from topk_core._api import DEFAULT_P, DEFAULT_STRENGTH

__all__ = [
    "MoE",
    "RoutingStats",
    "TopkPruning",
    "TopkRouter",
    "finalize_pruning",
    "moe_dispatch",
    "routing_stats",
    "topk_gates",
    "topk_loss",
]


def _straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y` in the forward pass, the identity's gradient in the backward pass (exact: ``x + (y - x) == y``)."""
    return x + (y - x).detach()


# --------------------------------------------------------------------------- pruning


class TopkPruning(nn.Module):
    """Parametrization keeping the entries of largest magnitude of a weight, softly.

    ``weight -> soft_topk_mag(weight, k)`` with ``k = round((1 - sparsity) * n)``,
    where ``n`` is the number of entries of the tensor (``per_row=False``) or
    of one output row, the slice ``weight.select(row_axis, i)``
    (``per_row=True``, then ``k`` entries per row).  The output has exact
    zeros outside a support of at least ``k`` entries per group, and the
    gradient flows through the soft operator (see `topk_torch.soft_topk_mag`).
    With ``hard=True`` the forward is the hard magnitude top-k and the
    backward the identity (the straight-through estimator), the usual
    baseline.

    Register it with
    ``torch.nn.utils.parametrize.register_parametrization(module, "weight", TopkPruning(0.9))``;
    `finalize_pruning` then replaces the parametrized weight by an exactly
    k-sparse tensor.  `sparsity` is a plain attribute: changing it between
    steps gives a pruning schedule.

    Parameters
    ----------
    sparsity : float
        Fraction of entries set to zero, ``0 <= sparsity < 1``.
    per_row : bool, default False
        Keep ``k`` entries in every slice along `row_axis` instead of ``k``
        in the whole tensor.
    row_axis : int, default 0
        The output axis (0 for `torch.nn.Linear` and `torch.nn.Conv2d`).
    hard : bool, default False
        Hard top-k with straight-through gradients instead of the soft operator.
    regularization_strength, p, method, max_iter, tol
        Keywords of `topk_torch.soft_topk_mag` (ignored when ``hard=True``).

    Examples
    --------
    >>> import torch
    >>> from torch.nn.utils import parametrize
    >>> from topk_torch.nn import TopkPruning, finalize_pruning
    >>> layer = torch.nn.Linear(8, 4)
    >>> pruning = TopkPruning(0.75, regularization_strength=0.01)
    >>> _ = parametrize.register_parametrization(layer, "weight", pruning)
    >>> pruning.num_kept(layer.weight)
    8
    >>> bool((layer.weight != 0).sum() >= 8)
    True
    >>> int((finalize_pruning(layer).weight != 0).sum())
    8
    """

    def __init__(
        self, sparsity: float, *, per_row: bool = False, row_axis: int = 0, hard: bool = False,
        regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P, method: str = "auto",
        max_iter: int | None = None, tol: float | None = None,
    ) -> None:
        super().__init__()
        self.sparsity = _checks.check_sparsity(sparsity)
        self.per_row = bool(per_row)
        self.row_axis = int(row_axis)
        self.hard = bool(hard)
        self.keywords = _checks.soft_keywords(regularization_strength, p, method, max_iter, tol)

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}, per_row={self.per_row}, hard={self.hard}"

    def _axis(self, weight: torch.Tensor) -> int:
        """`row_axis` checked against `weight` (an IndexError from deep inside torch before)."""
        return _validate.check_axis(self.row_axis, weight.ndim, "row_axis")

    def _groups(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` as a 2-d tensor with one selection group per row."""
        if not self.per_row:
            return weight.reshape(1, -1)
        axis = self._axis(weight)
        return weight.movedim(axis, 0).reshape(weight.shape[axis], -1)

    def _ungroup(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.per_row:
            return rows.reshape(weight.shape)
        axis = self._axis(weight)
        return rows.reshape(weight.movedim(axis, 0).shape).movedim(0, axis)

    def k(self, weight: torch.Tensor) -> int:
        """Entries kept per group: ``round((1 - sparsity) * group size)`` (0 for an empty weight)."""
        return _checks.kept_count(self.sparsity, _checks.group_sizes(weight.shape, self.per_row, self.row_axis)[1])

    def num_kept(self, weight: torch.Tensor) -> int:
        """Non-zeros of the finalized weight (when `weight` has that many non-zeros): ``k`` times the number of groups."""
        groups, size = _checks.group_sizes(weight.shape, self.per_row, self.row_axis)
        return groups * _checks.kept_count(self.sparsity, size)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.numel() == 0:  # nothing to prune (the groups' reshape cannot infer an empty size)
            return weight
        rows = self._groups(weight)
        k = self.k(weight)
        if self.hard:
            out = _straight_through(rows, _tk.hard_topk_mag(rows.detach(), k))
        else:
            out = _tk.soft_topk_mag(rows, k, **self.keywords)
        return self._ungroup(out, weight)

    def project(self, value: torch.Tensor) -> torch.Tensor:
        """Hard magnitude top-k of an already parametrized `value` (no gradient): at most ``num_kept`` non-zeros."""
        with torch.no_grad():
            if value.numel() == 0:
                return value.clone()
            return self._ungroup(_tk.hard_topk_mag(self._groups(value), self.k(value)), value)

    def finalize(self, weight: torch.Tensor) -> torch.Tensor:
        """The k-sparse weight for deployment: the hard top-k of ``self(weight)``.

        The soft output keeps its clear winners unchanged and is monotone in
        ``|weight|``, so this keeps the ``k`` largest soft values per group,
        exactly ``num_kept(weight)`` non-zeros when the soft output has that
        many.
        """
        with torch.no_grad():
            return self.project(self(weight))


def finalize_pruning(module: nn.Module, name: str = "weight") -> nn.Module:
    """Replace the parametrized `name` of `module` by its exactly k-sparse finalized value.

    The last parametrization registered on `name` must be a `TopkPruning`.
    The parametrizations are removed and the original `torch.nn.Parameter`
    (the same object, so optimizers keep working) receives the hard top-k of
    the parametrized value.  Returns `module`.

    Raises
    ------
    ValueError
        When `name` is not parametrized, or its last parametrization is not a `TopkPruning`.
    """
    if not parametrize.is_parametrized(module, name):
        raise ValueError(f"`{name}` of {type(module).__name__} is not parametrized; register a TopkPruning first")
    last = module.parametrizations[name][-1]
    if not isinstance(last, TopkPruning):
        raise ValueError(f"the last parametrization of `{name}` must be a TopkPruning; got {type(last).__name__}")
    with torch.no_grad():
        final = last.project(getattr(module, name))
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    with torch.no_grad():
        getattr(module, name).copy_(final)
    return module


# --------------------------------------------------------------------------- mixture of experts


def topk_gates(
    logits: torch.Tensor, k: int, *, hard: bool = False, regularization_strength: float = DEFAULT_STRENGTH,
    p: float = DEFAULT_P, method: str = "auto", max_iter: int | None = None, tol: float | None = None,
) -> torch.Tensor:
    """Per-token expert gates ``soft_topk_mag(softmax(logits), k)`` along the last axis.

    The gates are exactly zero outside a support of at least `k` experts per
    token (clear winners keep their softmax probability), so a token is sent
    only to the experts with a non-zero gate.  ``hard=True`` gives the usual
    hard router, the softmax probabilities of the `k` largest logits (ties
    toward the lower index), differentiable through the kept probabilities.

    Parameters
    ----------
    logits : torch.Tensor
        Router logits, experts along the last axis.
    k : int
        Experts per token, ``1 <= k <= logits.shape[-1]``.
    hard : bool, default False
        Hard top-k of the probabilities instead of the soft operator.
    regularization_strength, p, method, max_iter, tol
        Keywords of `topk_torch.soft_topk_mag`.

    Returns
    -------
    torch.Tensor
        Shape and dtype of `logits`, non-negative, at most the softmax probabilities.

    Examples
    --------
    >>> import torch
    >>> from topk_torch.nn import topk_gates
    >>> logits = torch.tensor([[2.0, 1.0, -1.0, 0.5], [1.0, 1.0, 0.8, -1.0]])
    >>> topk_gates(logits, k=1)  # a clear winner keeps its probability; a tie shares the gate
    tensor([[0.6095, 0.0000, 0.0000, 0.0000],
            [0.1954, 0.1954, 0.0000, 0.0000]])
    >>> topk_gates(logits, k=1, hard=True)
    tensor([[0.6095, 0.0000, 0.0000, 0.0000],
            [0.3385, 0.0000, 0.0000, 0.0000]])
    """
    probs = torch.softmax(logits, dim=-1)
    if hard:
        return _tk.hard_topk_mag(probs, k)
    return _tk.soft_topk_mag(probs, k, **_checks.soft_keywords(regularization_strength, p, method, max_iter, tol))


class RoutingStats(NamedTuple):
    """Where the tokens went, from the gates of `topk_gates` (no gradient)."""

    experts_per_token: torch.Tensor
    """(tokens,) int64: number of experts with a non-zero gate for each token."""
    load: torch.Tensor
    """(experts,) int64: number of tokens sent to each expert."""
    gate_mass: torch.Tensor
    """(experts,) float: sum of the gates of each expert."""

    @property
    def mean_experts_per_token(self) -> float:
        """Mean number of experts per token (NaN when there are no tokens)."""
        return float(_routing.mean_experts_per_token(self.experts_per_token.double()))

    @property
    def load_imbalance(self) -> float:
        """Maximum load over mean load (1 is perfectly balanced; NaN when no token was routed)."""
        return float(_routing.load_imbalance(self.load.double()))


def routing_stats(gates: torch.Tensor) -> RoutingStats:
    """Experts per token and load per expert of `gates` (tokens on all leading axes, experts last).

    Examples
    --------
    >>> import torch
    >>> from topk_torch.nn import routing_stats
    >>> stats = routing_stats(torch.tensor([[0.5, 0.0, 0.2], [0.0, 0.0, 0.9]]))
    >>> stats.experts_per_token, stats.load
    (tensor([2, 1]), tensor([1, 0, 2]))
    """
    if gates.ndim == 0:
        raise ValueError("`gates` must have at least one dimension (experts last); got a 0-d tensor")
    with torch.no_grad():
        # Explicit sizes: `-1` is ambiguous when there are no experts.
        flat = gates.detach().reshape(math.prod(gates.shape[:-1]), gates.shape[-1])
        nonzero = flat != 0
        return RoutingStats(nonzero.sum(dim=1), nonzero.sum(dim=0), flat.sum(dim=0))


class TopkRouter(nn.Module):
    """A linear router followed by `topk_gates`: ``x -> topk_gates(x @ W.T + b, k)``.

    Parameters
    ----------
    in_features : int
        Size of a token.
    num_experts : int
        Number of experts.
    k : int
        Experts per token, ``1 <= k <= num_experts``.
    bias : bool, default True
        Whether the linear map has a bias.
    hard, regularization_strength, p, method, max_iter, tol
        Keywords of `topk_gates`.
    """

    def __init__(
        self, in_features: int, num_experts: int, k: int, *, bias: bool = True, hard: bool = False,
        regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P, method: str = "auto",
        max_iter: int | None = None, tol: float | None = None,
    ) -> None:
        super().__init__()
        # (numbers.Integral: NumPy integers too, as `topk_gates` and topk_jax's router take them.)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_experts:
            raise ValueError(f"`k` must be an int with 1 <= k <= num_experts = {num_experts}; got k = {k!r}")
        self.linear = nn.Linear(in_features, num_experts, bias=bias)
        self.k = int(k)
        self.hard = bool(hard)
        self.keywords = _checks.soft_keywords(regularization_strength, p, method, max_iter, tol)

    def extra_repr(self) -> str:
        return f"k={self.k}, hard={self.hard}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gates of shape ``(*x.shape[:-1], num_experts)``."""
        return topk_gates(self.linear(x), self.k, hard=self.hard, **self.keywords)


def _capacity_slots(column: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `capacity` tokens routed to one expert, in token order, as ``(tokens, kept)``: `capacity`
    token indices (the padding repeats token 0) and which of them are routed tokens.

    Static shapes (no `torch.nonzero`), so that `torch.compile` takes the dispatch whole: a routed token's
    slot is its rank among the routed ones; the others (and routed tokens beyond the capacity) write to
    slots of their own past the buffer, so that every index of the scatter is distinct (deterministic).
    """
    routed = column != 0
    order = torch.arange(column.shape[0], device=column.device)
    rank = torch.cumsum(routed.to(torch.int64), 0) - 1
    slot = torch.where(routed & (rank < capacity), rank, capacity + order)
    tokens = torch.zeros(capacity + column.shape[0], dtype=torch.int64, device=column.device)
    tokens = tokens.scatter(0, slot, order)[:capacity]
    kept = torch.arange(capacity, device=column.device) < routed.sum()
    return tokens, kept


def moe_dispatch(
    x: torch.Tensor, gates: torch.Tensor, experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    out_features: int | None = None, *, capacity: int | None = None,
) -> torch.Tensor:
    """Sparse mixture-of-experts combination ``y_t = sum_e gates[t, e] * experts[e](x_t)``.

    Each expert runs only on the tokens with a non-zero gate: they are
    gathered (`torch.Tensor.index_select`), passed through the expert,
    weighted by their gates and scattered back (`torch.Tensor.index_add`).
    Differentiable in `x`, in `gates` and in the experts' parameters.

    * ``capacity=None``: every routed token is processed; experts that
      receive no token are not called.  The number of tokens of an expert
      sets tensor shapes, so `torch.compile` compiles this with graph breaks.
    * ``capacity=c``: every expert processes a fixed buffer of ``c`` rows,
      so that ``torch.compile(fullgraph=True)`` takes it whole.  An expert
      with more than ``c`` tokens processes the first ``c`` in token order and
      drops the others (as in Switch Transformers, and `topk_jax.nn`'s
      `capacity`); with ``c >= tokens`` nothing is dropped and the result is
      that of ``capacity=None``.  The padding rows are selected away (an
      expert output that overflows on them cannot reach the result).

    Parameters
    ----------
    x : torch.Tensor
        Tokens, shape ``(tokens, in_features)``.
    gates : torch.Tensor
        Shape ``(tokens, num_experts)``, e.g. from `topk_gates`.
    experts : sequence of callables
        ``experts[e]`` maps ``(n, in_features)`` to ``(n, out_features)``.
    out_features : int, optional
        Output size; by default that of the first expert that runs (needed
        when no expert may receive a token).
    capacity : int, optional
        Rows per expert (see above).

    Returns
    -------
    torch.Tensor
        Shape ``(tokens, out_features)``.

    Raises
    ------
    ValueError
        For mismatched shapes, experts of different output sizes, a
        `capacity` that is not a positive int, or no expert to run without
        `out_features`.

    Examples
    --------
    >>> import torch
    >>> from topk_torch.nn import moe_dispatch, topk_gates
    >>> _ = torch.manual_seed(0)
    >>> x, experts = torch.randn(6, 4), [torch.nn.Linear(4, 3) for _ in range(2)]
    >>> gates = topk_gates(torch.randn(6, 2), k=1, hard=True)
    >>> torch.allclose(moe_dispatch(x, gates, experts, capacity=6), moe_dispatch(x, gates, experts))
    True
    """
    if x.ndim != 2 or gates.ndim != 2 or gates.shape[0] != x.shape[0] or gates.shape[1] != len(experts):
        raise ValueError(
            f"`x` must be (tokens, features) and `gates` (tokens, {len(experts)} experts); "
            f"got x.shape = {tuple(x.shape)}, gates.shape = {tuple(gates.shape)}"
        )
    capacity = _checks.check_capacity(capacity)
    out: torch.Tensor | None = None
    if out_features is not None:
        out = x.new_zeros((x.shape[0], out_features), dtype=torch.promote_types(x.dtype, gates.dtype))
    for e, expert in enumerate(experts):
        kept: torch.Tensor | None = None
        if capacity is None:
            tokens = torch.nonzero(gates[:, e], as_tuple=True)[0]
            if tokens.numel() == 0:
                continue
        elif x.shape[0] == 0:
            continue  # (a buffer of `capacity` rows would gather token 0, which is not there)
        else:
            tokens, kept = _capacity_slots(gates[:, e], capacity)
        y = expert(x.index_select(0, tokens)) * gates[tokens, e].unsqueeze(1)
        if kept is not None:
            y = torch.where(kept.unsqueeze(1), y, torch.zeros_like(y))
        if out is None:
            out = y.new_zeros((x.shape[0], y.shape[1]))
        if y.ndim != 2 or y.shape[1] != out.shape[1]:
            raise ValueError(
                f"expert {e} returned shape {tuple(y.shape)} for {tokens.numel()} tokens; the output has "
                f"{out.shape[1]} features (`out_features`, or the first expert's): experts must agree"
            )
        # (In out's dtype: under torch.autocast an expert's output is bfloat16 or float16, and index_add
        # refused to add it to a float32 `out`.)
        out = out.index_add(0, tokens, y.to(out.dtype))
    if out is None:
        raise ValueError("no expert received a token and `out_features` is None: pass `out_features`")
    if x.shape[0] == 0:
        # No token, no expert ran: still an output of the graph (zero gradients to the gates), as
        # `torch.nn.Linear` gives on 0 rows; it did not require grad, and `backward` raised.
        out = out + 0.0 * gates.sum()
    return out


class MoE(nn.Module):
    """A sparse mixture-of-experts layer: a `TopkRouter` and two-layer MLP experts, dispatched with `moe_dispatch`.

    Tokens are all the leading axes of the input; the output has shape
    ``(*x.shape[:-1], out_features)``.

    Parameters
    ----------
    in_features : int
        Size of a token.
    num_experts : int
        Number of experts.
    k : int
        Experts per token of the router.
    hidden_features : int
        Hidden size of each expert ``Linear -> GELU -> Linear``.
    out_features : int, optional
        Output size (default `in_features`).
    experts : sequence of nn.Module, optional
        Custom experts instead of the MLPs (then `hidden_features` is unused).
    capacity : int, optional
        Rows per expert of `moe_dispatch`: with a fixed capacity the layer
        compiles whole (``torch.compile(fullgraph=True)``), and an expert's
        tokens beyond it are dropped; ``None`` (default) processes every
        routed token.
    hard, regularization_strength, p, method, max_iter, tol
        Keywords of `topk_gates`.

    Examples
    --------
    >>> import torch
    >>> from topk_torch.nn import MoE, routing_stats
    >>> _ = torch.manual_seed(0)
    >>> moe = MoE(16, num_experts=4, k=2, hidden_features=32)
    >>> y, gates = moe(torch.randn(10, 16), return_gates=True)
    >>> y.shape, gates.shape
    (torch.Size([10, 16]), torch.Size([10, 4]))
    >>> bool((routing_stats(gates).experts_per_token >= 2).all())
    True
    """

    def __init__(
        self, in_features: int, num_experts: int, k: int, hidden_features: int = 64, *,
        out_features: int | None = None, experts: Sequence[nn.Module] | None = None, capacity: int | None = None,
        hard: bool = False, regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P,
        method: str = "auto", max_iter: int | None = None, tol: float | None = None,
    ) -> None:
        super().__init__()
        self.capacity = _checks.check_capacity(capacity)
        self.out_features = in_features if out_features is None else int(out_features)
        self.router = TopkRouter(
            in_features, num_experts, k, hard=hard, regularization_strength=regularization_strength, p=p,
            method=method, max_iter=max_iter, tol=tol,
        )
        if experts is None:
            experts = [
                nn.Sequential(nn.Linear(in_features, hidden_features), nn.GELU(), nn.Linear(hidden_features, self.out_features))
                for _ in range(num_experts)
            ]
        if len(experts) != num_experts:
            raise ValueError(f"`experts` must hold num_experts = {num_experts} modules; got {len(experts)}")
        self.experts = nn.ModuleList(experts)

    def forward(self, x: torch.Tensor, *, return_gates: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The layer's output, and the gates ``(*x.shape[:-1], num_experts)`` when `return_gates`."""
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])
        gates = self.router(tokens)
        y = moe_dispatch(tokens, gates, self.experts, self.out_features, capacity=self.capacity)
        y = y.reshape(*lead, self.out_features)
        return (y, gates.reshape(*lead, gates.shape[-1])) if return_gates else y


# --------------------------------------------------------------------------- top-k loss


def _check_labels(labels: torch.Tensor, classes: int) -> None:
    """TypeError for labels that are no integers (float labels were truncated); ValueError for labels outside
    ``[0, classes)`` where that costs no device synchronization and no graph break (CPU tensors, eager):
    elsewhere torch's gather reports them (a device-side assertion on CUDA)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must be integer class indices; got dtype {labels.dtype}")
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        outside = (labels < 0) | (labels >= classes)
        if bool(outside.any()):
            raise ValueError(f"`labels` must be class indices in [0, {classes}); got {labels[outside][:5].tolist()}")


def topk_loss(
    scores: torch.Tensor, labels: torch.Tensor, k: int | Sequence[int] = 5, *,
    k_weights: Sequence[float] | None = None, ce_weight: float = 0.5, eps: float = 1e-2, reduction: str = "mean",
    regularization_strength: float = DEFAULT_STRENGTH, p: float = DEFAULT_P, method: str = "auto",
    max_iter: int | None = None, tol: float | None = None,
) -> torch.Tensor:
    r"""Differentiable top-k classification loss on the sparse soft top-k mask, mixed with cross-entropy.

    With scores ``s`` (classes on the last axis), true class ``y``, a
    mixture ``pi`` over the values ``k_j`` of `k` (weights `k_weights`,
    normalized; uniform by default) and ``m_k = soft_topk_mask(s, k)``:

    .. code-block:: text

        P(s, y) = sum_j pi_j * m_{k_j}(s)_y                      (soft membership of y in the top-k, in [0, 1])
        loss    = ce_weight * CE(s, y) - (1 - ce_weight) * log(eps + (1 - eps) * P(s, y))

    ``m_k(s)_y`` is exactly 1 when ``y`` is clearly in the top ``k``
    (no gradient: the sample is already right), exactly 0 when it is clearly
    out, and in between on the boundary, where the gradient moves ``s_y``
    against its competitors only.  Because the mask is sparse, a sample
    whose true class lies outside the support gets no gradient from the
    top-k term; the cross-entropy term ``CE(s, y) = -log softmax(s)_y``
    gives it one (and `eps` keeps the loss finite).  This follows the top-k
    loss of Petersen et al. (2022), a mixture over ``k`` of the top-k
    membership of the true class, with the sparse soft top-k mask in place
    of a differentiable sorting network.

    Parameters
    ----------
    scores : torch.Tensor
        Logits, shape ``(..., classes)``, floating.
    labels : torch.Tensor
        Integer class indices in ``[0, classes)``, shape ``scores.shape[:-1]`` (ValueError outside, for
        CPU tensors outside `torch.compile`; elsewhere torch's indexing error).
    k : int or sequence of int, default 5
        The top-k sizes of the mixture, each in ``[1, classes]``, distinct.
    k_weights : sequence of float, optional
        Non-negative mixture weights, one per `k` (normalized); uniform by default.
    ce_weight : float, default 0.5
        Weight of the cross-entropy term, in [0, 1].
    eps : float, default 0.01
        Floor of the membership in the logarithm, in (0, 1).
    reduction : {"mean", "sum", "none"}, default "mean"
        Reduction over samples.
    regularization_strength, p, method, max_iter, tol
        Keywords of `topk_torch.soft_topk_mask`.

    Returns
    -------
    torch.Tensor
        A scalar (``"mean"``, ``"sum"``) or the per-sample losses (``"none"``), dtype of `scores`.

    Examples
    --------
    >>> import torch
    >>> from topk_torch.nn import topk_loss
    >>> scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    >>> loss = topk_loss(scores, torch.tensor([1, 0]), k=2)
    >>> loss.backward()
    >>> scores.grad.shape
    torch.Size([2, 4])
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"`reduction` must be 'mean', 'sum' or 'none'; got {reduction!r}")
    if labels.shape != scores.shape[:-1]:
        raise ValueError(f"`labels` must have shape scores.shape[:-1] = {tuple(scores.shape[:-1])}; got {tuple(labels.shape)}")
    mixture = _checks.loss_mixture(k, k_weights, scores.shape[-1])
    ce_weight = _checks.check_ce_weight(ce_weight)
    eps = _checks.check_eps(eps)
    keywords = _checks.soft_keywords(regularization_strength, p, method, max_iter, tol)
    _check_labels(labels, scores.shape[-1])
    index = labels.long().unsqueeze(-1)
    log_probs = torch.log_softmax(scores, dim=-1)
    ce = -log_probs.gather(-1, index).squeeze(-1)
    membership = sum(weight * _tk.soft_topk_mask(scores, kk, **keywords).gather(-1, index).squeeze(-1) for kk, weight in mixture)
    loss = ce_weight * ce - (1.0 - ce_weight) * torch.log(eps + (1.0 - eps) * membership)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss

