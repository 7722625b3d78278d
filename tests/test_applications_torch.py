"""topk_torch.nn: pruning parametrization, MoE router and dispatch, top-k loss.

Shapes and dtypes first, then exact sparsity counts, gradients, the MoE
dispatch against the dense mixture with the same gates (float64), and the
top-k loss against its formula written out with the public operators.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import topk_torch as tk  # noqa: E402
from topk_torch import nn as tnn  # noqa: E402

from ._torch_helpers import requires_compile  # noqa: E402

DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["float32", "float64"]


def _tensor(rng: np.random.Generator, shape, dtype=torch.float64, requires_grad=False) -> torch.Tensor:
    return torch.tensor(rng.normal(size=shape), dtype=dtype, requires_grad=requires_grad)


def test_exposed_as_attribute_of_the_adapter():
    assert tk.nn is tnn
    assert sorted(tnn.__all__) == tnn.__all__


# --- pruning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("per_row", [False, True], ids=["tensor", "per-row"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_pruning_forward_backward_shapes_and_counts(rng, dtype, per_row, hard):
    w = _tensor(rng, (6, 20), dtype, requires_grad=True)
    pruning = tnn.TopkPruning(0.9, per_row=per_row, hard=hard, regularization_strength=0.05)
    y = pruning(w)
    assert isinstance(y, torch.Tensor)
    assert (y.shape, y.dtype, y.device) == (w.shape, dtype, w.device)
    k = round(0.1 * (20 if per_row else 120))
    assert pruning.k(w) == k
    assert pruning.num_kept(w) == (6 * k if per_row else k)
    groups = y.detach().reshape(6, 20) if per_row else y.detach().reshape(1, -1)
    counts = (groups != 0).sum(dim=1)
    assert bool((counts >= k).all())
    if hard:
        assert bool((counts == k).all())
    y.backward(torch.ones_like(y))
    assert (w.grad.shape, w.grad.dtype) == (w.shape, dtype)
    final = pruning.finalize(w)
    assert (final.shape, final.dtype, final.requires_grad) == (w.shape, dtype, False)
    assert int((final != 0).sum()) == pruning.num_kept(w)


def test_pruning_keeps_the_largest_magnitudes_and_clear_winners_unchanged(rng):
    w = _tensor(rng, (50,))
    w[:3] = torch.tensor([10.0, -9.0, 8.0], dtype=w.dtype)
    y = tnn.TopkPruning(0.94, regularization_strength=0.01)(w)  # k = 3
    torch.testing.assert_close(y[:3], w[:3], rtol=0, atol=0)
    assert bool((y[3:] == 0).all())


def test_pruning_hard_is_straight_through(rng):
    w = _tensor(rng, (4, 10), requires_grad=True)
    pruning = tnn.TopkPruning(0.75, hard=True)
    y = pruning(w)
    torch.testing.assert_close(y, tk.hard_topk_mag(w.detach().reshape(1, -1), 10).reshape(4, 10), rtol=0, atol=0)
    u = _tensor(rng, (4, 10))
    y.backward(u)
    torch.testing.assert_close(w.grad, u, rtol=0, atol=0)


def test_pruning_soft_gradient_is_that_of_soft_topk_mag(rng):
    w = _tensor(rng, (3, 8), requires_grad=True)
    u = _tensor(rng, (3, 8))
    tnn.TopkPruning(0.5, per_row=True, p=2.0, regularization_strength=0.3)(w).backward(u)
    x = w.detach().clone().requires_grad_()
    tk.soft_topk_mag(x, 4, p=2.0, regularization_strength=0.3).backward(u)
    torch.testing.assert_close(w.grad, x.grad)


def test_pruning_per_row_along_another_axis(rng):
    w = _tensor(rng, (5, 3, 4))
    y = tnn.TopkPruning(0.5, per_row=True, row_axis=1, hard=True)(w)
    for i in range(3):
        assert int((y[:, i] != 0).sum()) == 10


@pytest.mark.parametrize("per_row", [False, True], ids=["tensor", "per-row"])
def test_pruning_parametrization_on_modules_and_finalize(rng, per_row):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    prunings = {}
    for layer in (model[0], model[2]):
        prunings[layer] = tnn.TopkPruning(0.8, per_row=per_row, regularization_strength=0.01)
        parametrize.register_parametrization(layer, "weight", prunings[layer])
    original = {layer: layer.parametrizations.weight.original for layer in prunings}
    x = _tensor(rng, (2, 3, 6, 6), torch.float32)
    model(x).sum().backward()
    for layer in prunings:
        assert original[layer].grad is not None and original[layer].grad.shape == original[layer].shape
    expected = {layer: prunings[layer].num_kept(layer.weight) for layer in prunings}
    assert expected[model[2]] == (10 * round(0.2 * 128) if per_row else round(0.2 * 1280))
    soft = {layer: layer.weight.detach().clone() for layer in prunings}
    for layer in prunings:
        assert tnn.finalize_pruning(layer) is layer
        assert not parametrize.is_parametrized(layer)
        assert layer.weight is original[layer]  # the same Parameter: optimizers keep working
        assert int((layer.weight != 0).sum()) == expected[layer]
        # The kept entries are the soft values of largest magnitude.
        kept = layer.weight != 0
        torch.testing.assert_close(layer.weight[kept], soft[layer][kept], rtol=0, atol=0)
        assert float(soft[layer][~kept].abs().max()) <= float(soft[layer][kept].abs().min())
    model(x)  # still a working module


def test_pruning_sparsity_is_a_schedule(rng):
    w = _tensor(rng, (10, 10))
    pruning = tnn.TopkPruning(0.5, hard=True)
    assert int((pruning(w) != 0).sum()) == 50
    pruning.sparsity = 0.9
    assert int((pruning(w) != 0).sum()) == 10


def test_pruning_small_strength_approaches_hard(rng):
    w = _tensor(rng, (40,))
    soft = tnn.TopkPruning(0.75, regularization_strength=1e-6)(w)
    torch.testing.assert_close(soft, tk.hard_topk_mag(w, 10), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("sparsity", "error", "match"),
    [(1.0, ValueError, r"\[0, 1\)"), (-0.1, ValueError, r"\[0, 1\)"), ("0.5", TypeError, "real number"),
     (True, TypeError, "real number"), (float("nan"), ValueError, r"\[0, 1\)")],
)
def test_pruning_rejects_bad_sparsity(sparsity, error, match):
    with pytest.raises(error, match=match):
        tnn.TopkPruning(sparsity)


def test_pruning_rejects_sparsity_that_keeps_nothing():
    with pytest.raises(ValueError, match="keeps round"):
        tnn.TopkPruning(0.99)(torch.ones(3, 10))


def test_finalize_pruning_errors():
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="not parametrized"):
        tnn.finalize_pruning(layer)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(layer, "weight", Double())
    with pytest.raises(ValueError, match="must be a TopkPruning"):
        tnn.finalize_pruning(layer)


def test_finalize_pruning_after_another_parametrization(rng):
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = nn.Linear(10, 4).double()
    parametrize.register_parametrization(layer, "weight", Double())
    parametrize.register_parametrization(layer, "weight", tnn.TopkPruning(0.5, hard=True))
    expected = tk.hard_topk_mag((2 * layer.parametrizations.weight.original.detach()).reshape(1, -1), 20)
    tnn.finalize_pruning(layer)
    torch.testing.assert_close(layer.weight.detach(), expected.reshape(4, 10), rtol=0, atol=0)


# --- MoE gates, stats, dispatch --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gates_shapes_sparsity_and_gradient(rng, dtype, hard, k):
    logits = _tensor(rng, (2, 7, 6), dtype, requires_grad=True)
    gates = tnn.topk_gates(logits, k, hard=hard)
    assert (gates.shape, gates.dtype) == (logits.shape, dtype)
    probs = torch.softmax(logits.detach(), dim=-1)
    counts = (gates.detach() != 0).sum(dim=-1)
    assert bool((counts == k).all()) if hard else bool((counts >= k).all())
    assert bool((gates.detach() >= 0).all())
    assert bool((gates.detach() <= probs * (1 + 1e-6)).all())
    gates.sum().backward()
    assert (logits.grad.shape, logits.grad.dtype) == (logits.shape, dtype)
    assert bool(torch.isfinite(logits.grad).all())


def test_gates_are_soft_topk_mag_of_softmax(rng):
    logits = _tensor(rng, (5, 8))
    expected = tk.soft_topk_mag(torch.softmax(logits, -1), 2, p=2.0, regularization_strength=0.05)
    torch.testing.assert_close(tnn.topk_gates(logits, 2, p=2.0, regularization_strength=0.05), expected)
    hard = tnn.topk_gates(logits, 2, hard=True)
    torch.testing.assert_close(hard, tk.hard_topk_mag(torch.softmax(logits, -1), 2))


def test_gates_pass_the_method_keywords(rng):
    logits = _tensor(rng, (4, 8))
    pav = tnn.topk_gates(logits, 3, p=2.0, method="pav")
    for method, extra in (("threshold", {}), ("dykstra", {"max_iter": 2000, "tol": 1e-12})):
        torch.testing.assert_close(tnn.topk_gates(logits, 3, p=2.0, method=method, **extra), pav, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        tnn.topk_gates(logits, 3, method="dykstra")  # p = 4/3


def test_routing_stats():
    gates = torch.tensor([[[0.5, 0.0, 0.2]], [[0.0, 0.0, 0.9]]], requires_grad=True)
    stats = tnn.routing_stats(gates)
    assert stats.experts_per_token.tolist() == [2, 1]
    assert stats.load.tolist() == [1, 0, 2]
    torch.testing.assert_close(stats.gate_mass, torch.tensor([0.5, 0.0, 1.1]))
    assert stats.mean_experts_per_token == 1.5
    assert stats.load_imbalance == pytest.approx(2.0)
    assert not stats.gate_mass.requires_grad


def test_routing_stats_edge_shapes():
    no_experts = tnn.routing_stats(torch.zeros(2, 3, 0))  # was a RuntimeError of reshape(-1, 0)
    assert no_experts.experts_per_token.tolist() == [0] * 6 and no_experts.load.shape == (0,)
    assert no_experts.mean_experts_per_token == 0.0 and math.isnan(no_experts.load_imbalance)
    no_tokens = tnn.routing_stats(torch.zeros(0, 4))
    assert math.isnan(no_tokens.mean_experts_per_token) and math.isnan(no_tokens.load_imbalance)
    with pytest.raises(ValueError, match="`gates` must have at least one dimension"):
        tnn.routing_stats(torch.tensor(1.0))


class _Counting(nn.Module):
    """An expert that records how many tokens it saw."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return torch.tanh(self.linear(x))


def _dense(x, gates, experts):
    return sum(gates[:, e: e + 1] * expert(x) for e, expert in enumerate(experts))


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("k", [1, 2])
def test_dispatch_equals_dense_mixture_float64(rng, hard, k):
    torch.manual_seed(0)
    experts = [_Counting(5, 3).double() for _ in range(6)]
    x = _tensor(rng, (40, 5), requires_grad=True)
    logits = _tensor(rng, (40, 6), requires_grad=True)
    gates = tnn.topk_gates(logits, k, hard=hard, regularization_strength=0.2)
    stats = tnn.routing_stats(gates)
    y = tnn.moe_dispatch(x, gates, experts)
    assert (y.shape, y.dtype) == ((40, 3), torch.float64)
    # Each expert ran once, on exactly its tokens; experts with none were not called.
    for e, expert in enumerate(experts):
        assert expert.seen == ([int(stats.load[e])] if int(stats.load[e]) else [])
    u = _tensor(rng, (40, 3))
    grads = torch.autograd.grad(y, [x, logits, *experts[0].parameters()], u, allow_unused=True, retain_graph=True)
    dense = _dense(x, gates, experts)
    torch.testing.assert_close(y, dense, rtol=1e-13, atol=1e-13)
    dense_grads = torch.autograd.grad(dense, [x, logits, *experts[0].parameters()], u, allow_unused=True)
    for ours, theirs in zip(grads, dense_grads, strict=True):
        if ours is None:
            assert theirs is None or bool((theirs == 0).all())
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_dispatch_skips_idle_experts_and_needs_out_features_when_all_idle():
    experts = [_Counting(2, 3).double() for _ in range(3)]
    x = torch.ones(4, 2, dtype=torch.float64)
    gates = torch.zeros(4, 3, dtype=torch.float64)
    gates[:, 1] = 0.5
    y = tnn.moe_dispatch(x, gates, experts)
    assert [e.seen for e in experts] == [[], [4], []]
    torch.testing.assert_close(y, 0.5 * experts[1](x))
    zero = tnn.moe_dispatch(x, torch.zeros(4, 3, dtype=torch.float64), experts, out_features=3)
    assert (zero.shape, zero.dtype, bool((zero == 0).all())) == ((4, 3), torch.float64, True)
    with pytest.raises(ValueError, match="out_features"):
        tnn.moe_dispatch(x, torch.zeros(4, 3, dtype=torch.float64), experts)
    with pytest.raises(ValueError, match="gates"):
        tnn.moe_dispatch(x, gates[:, :2], experts)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_moe_layer_shapes_gradients_and_dense_equivalence(rng, dtype, hard):
    torch.manual_seed(0)
    moe = tnn.MoE(6, num_experts=4, k=2, hidden_features=8, out_features=5, hard=hard).to(dtype)
    x = _tensor(rng, (3, 7, 6), dtype, requires_grad=True)
    y, gates = moe(x, return_gates=True)
    assert (y.shape, y.dtype, gates.shape, gates.dtype) == ((3, 7, 5), dtype, (3, 7, 4), dtype)
    assert isinstance(moe(x), torch.Tensor)
    y.sum().backward()
    assert (x.grad.shape, x.grad.dtype) == (x.shape, dtype)
    assert moe.router.linear.weight.grad is not None
    load = tnn.routing_stats(gates).load
    for e, expert in enumerate(moe.experts):
        assert (expert[0].weight.grad is not None) == bool(load[e] > 0)
    if dtype == torch.float64:
        tokens = x.detach().reshape(-1, 6)
        dense = _dense(tokens, moe.router(tokens), moe.experts).reshape(3, 7, 5)
        torch.testing.assert_close(y.detach(), dense.detach(), rtol=1e-13, atol=1e-13)


def test_moe_custom_experts_and_errors():
    experts = [nn.Linear(4, 4) for _ in range(3)]
    moe = tnn.MoE(4, 3, 1, experts=experts)
    assert list(moe.experts) == experts
    with pytest.raises(ValueError, match="num_experts = 3"):
        tnn.MoE(4, 3, 1, experts=experts[:2])
    for k in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match="1 <= k <= num_experts"):
            tnn.MoE(4, 3, k)


# --- top-k loss ------------------------------------------------------------------------------------


def _loss_by_hand(scores, labels, mixture, ce_weight, eps, **keywords):
    idx = labels.unsqueeze(-1)
    ce = -torch.log_softmax(scores, -1).gather(-1, idx).squeeze(-1)
    member = sum(w * tk.soft_topk_mask(scores, k, **keywords).gather(-1, idx).squeeze(-1) for k, w in mixture)
    return ce_weight * ce - (1 - ce_weight) * torch.log(eps + (1 - eps) * member)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_topk_loss_shapes_dtypes_and_formula(rng, dtype, reduction):
    scores = _tensor(rng, (2, 6, 12), dtype, requires_grad=True)
    labels = torch.tensor(rng.integers(12, size=(2, 6)))
    loss = tnn.topk_loss(scores, labels, k=[1, 3], k_weights=[1.0, 3.0], ce_weight=0.3, eps=0.05,
                         reduction=reduction, regularization_strength=0.5, p=2.0)
    assert loss.dtype == dtype
    assert loss.shape == ((2, 6) if reduction == "none" else ())
    expected = _loss_by_hand(scores, labels, [(1, 0.25), (3, 0.75)], 0.3, 0.05, regularization_strength=0.5, p=2.0)
    expected = {"mean": expected.mean(), "sum": expected.sum(), "none": expected}[reduction]
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert (scores.grad.shape, scores.grad.dtype) == (scores.shape, dtype)
    assert bool(torch.isfinite(scores.grad).all())


def test_topk_loss_is_cross_entropy_when_ce_weight_is_one(rng):
    scores = _tensor(rng, (8, 10))
    labels = torch.tensor(rng.integers(10, size=8))
    torch.testing.assert_close(tnn.topk_loss(scores, labels, ce_weight=1.0), nn.functional.cross_entropy(scores, labels))


def test_topk_loss_gradient_outside_the_support_comes_from_cross_entropy():
    # Class 3 is far outside the top 2: its soft membership is exactly 0 and has no gradient.
    scores = torch.tensor([[5.0, 4.0, 3.0, -5.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3])
    pure_topk = tnn.topk_loss(scores, labels, k=2, ce_weight=0.0, eps=0.01)
    assert pure_topk.item() == pytest.approx(-math.log(0.01))
    (grad,) = torch.autograd.grad(pure_topk, scores)
    assert bool((grad == 0).all())
    (grad,) = torch.autograd.grad(tnn.topk_loss(scores, labels, k=2, ce_weight=0.5), scores)
    (ce_grad,) = torch.autograd.grad(0.5 * nn.functional.cross_entropy(scores, labels), scores)
    torch.testing.assert_close(grad, ce_grad)
    assert float(grad[0, 3]) < 0  # pushes the true class up


def test_topk_loss_no_gradient_from_topk_term_when_clearly_inside():
    scores = torch.tensor([[5.0, 4.0, 3.0, -5.0]], dtype=torch.float64, requires_grad=True)
    loss = tnn.topk_loss(scores, torch.tensor([1]), k=2, ce_weight=0.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    (grad,) = torch.autograd.grad(loss, scores)
    assert bool((grad == 0).all())


def test_topk_loss_on_the_boundary_moves_the_true_class_up(rng):
    scores = torch.tensor([[2.0, 1.0, 0.95, -3.0]], dtype=torch.float64, requires_grad=True)
    loss = tnn.topk_loss(scores, torch.tensor([2]), k=2, ce_weight=0.0, p=2.0, regularization_strength=1.0)
    (grad,) = torch.autograd.grad(loss, scores)
    assert float(grad[0, 2]) < 0 < float(grad[0, 1])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({"k": 0}, ValueError, "1 <= k"), ({"k": 13}, ValueError, "1 <= k"), ({"k": [2, 2]}, ValueError, "repeat"),
     ({"k": 2.0}, TypeError, "ints"), ({"k": [1, 5], "k_weights": [1.0]}, ValueError, "k_weights"),
     ({"k": [1, 5], "k_weights": [0.0, 0.0]}, ValueError, "all zero"), ({"ce_weight": 1.5}, ValueError, "ce_weight"),
     ({"eps": 0.0}, ValueError, "eps"), ({"reduction": "max"}, ValueError, "reduction"),
     ({"p": 0.5}, ValueError, "p")],
)
def test_topk_loss_rejects_bad_arguments(kwargs, error, match):
    scores = torch.zeros(3, 12)
    with pytest.raises(error, match=match):
        tnn.topk_loss(scores, torch.zeros(3, dtype=torch.long), **kwargs)


def test_topk_loss_rejects_bad_label_shape():
    with pytest.raises(ValueError, match="labels"):
        tnn.topk_loss(torch.zeros(3, 12), torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------ edge cases found by an audit


@requires_compile()
def test_a_sparsity_schedule_compiles_with_fullgraph(rng):
    # `sparsity` changed between calls is a symbolic float for Dynamo: `math.isfinite` in its check could
    # not take it (the schedule's second step failed to compile).  One graph per k, values as eager.
    layer = nn.Linear(10, 4).double()
    pruning = tnn.TopkPruning(0.5, regularization_strength=0.01)
    parametrize.register_parametrization(layer, "weight", pruning)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = _tensor(rng, (3, 10))
    for sparsity in (0.5, 0.75, 0.6, 0.75):
        pruning.sparsity = sparsity
        got = compiled(x)
        torch.testing.assert_close(got, layer(x))
        got.sum().backward()
        assert int((layer.weight != 0).sum()) >= pruning.num_kept(layer.weight)


def test_moe_under_autocast():
    # An expert's output is bfloat16 under autocast; index_add refused it into a float32 output.
    torch.manual_seed(0)
    moe = tnn.MoE(6, 4, 2, 8)
    x = torch.randn(5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.shape == (5, 6) and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), moe(x), atol=0.05, rtol=0.05)


def test_moe_on_no_token_is_part_of_the_graph():
    # No expert runs: the output did not require grad, and backward raised.
    moe = tnn.MoE(6, 4, 2, 8)
    y = moe(torch.randn(0, 6))
    assert y.shape == (0, 6) and y.requires_grad
    y.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in moe.parameters())


@pytest.mark.parametrize(("shape", "per_row"), [((0, 4), False), ((4, 0), True), ((0, 4), True)])
def test_pruning_an_empty_weight_returns_it(shape, per_row):
    # kept_count divided by the group size 0 in its error message (ZeroDivisionError), and the per-row
    # grouping could not reshape 0 rows.
    pruning = tnn.TopkPruning(0.5, per_row=per_row)
    w = torch.randn(shape)
    assert pruning(w).shape == shape and pruning.project(w).shape == shape
    assert pruning.num_kept(w) == 0


def test_topk_loss_refuses_labels_outside_the_classes_and_float_labels():
    scores = torch.tensor([[0.3, 2.0, -1.0, 0.5, 1.2]])
    for label in (-1, 5, -100):
        with pytest.raises(ValueError, match=r"`labels` must be class indices in \[0, 5\)"):
            tnn.topk_loss(scores, torch.tensor([label]), k=2)
    with pytest.raises(TypeError, match="`labels` must be integer class indices"):
        tnn.topk_loss(scores, torch.tensor([1.0]), k=2)  # (was truncated to 1)


def test_router_and_moe_take_numpy_integers_for_k():
    # As `topk_gates` and topk_jax's router do; they raised "`k` must be an int".
    router = tnn.TopkRouter(6, 4, np.int64(2))
    assert router.k == 2 and type(router.k) is int
    assert tnn.MoE(6, 4, np.int64(2), 8)(torch.randn(3, 6)).shape == (3, 6)


@pytest.mark.parametrize("build", [
    lambda: tnn.TopkPruning(0.5, regularization_strength=-1.0),
    lambda: tnn.TopkRouter(6, 4, 2, p=0.5),
    lambda: tnn.MoE(6, 4, 2, 8, method="dykstra"),  # p = 4/3 by default: dykstra solves p = 2 only
], ids=["pruning-strength", "router-p", "moe-method"])
def test_soft_keywords_are_checked_when_the_module_is_built(build):
    # They were checked at the first forward only.
    with pytest.raises(ValueError, match=r"`regularization_strength`|`p`|dykstra"):
        build()


def test_pruning_row_axis_out_of_range_names_it():
    with pytest.raises(ValueError, match=r"`row_axis` must be an int in \[-2, 1\]"):
        tnn.TopkPruning(0.5, per_row=True, row_axis=3)(torch.randn(4, 5))


def test_moe_dispatch_names_experts_of_another_output_size():
    # It failed inside index_add ("source tensor shape must match self tensor shape").
    x, gates = torch.randn(4, 6), torch.ones(4, 2)
    experts = [nn.Linear(6, 6), nn.Linear(6, 3)]
    with pytest.raises(ValueError, match=r"expert 1 returned shape \(4, 3\) for 4 tokens; the output has 6 features"):
        tnn.moe_dispatch(x, gates, experts)
    with pytest.raises(ValueError, match="expert 0 returned shape"):
        tnn.moe_dispatch(x, gates, experts, out_features=3)


# --- dispatch with a fixed capacity ----------------------------------------------------------------


def _first_tokens(gates: torch.Tensor, capacity: int) -> torch.Tensor:
    """`gates` with each expert's routed tokens beyond its first `capacity` (in token order) set to 0."""
    kept = torch.zeros_like(gates, dtype=torch.bool)
    for e in range(gates.shape[1]):
        kept[torch.nonzero(gates[:, e]).flatten()[:capacity], e] = True
    return torch.where(kept, gates, torch.zeros_like(gates))


@pytest.mark.parametrize("capacity", [40, 64, 3, 1, np.int64(2)], ids=["40", "64", "3", "1", "np.int64(2)"])
def test_dispatch_with_capacity_keeps_each_experts_first_tokens(rng, capacity):
    # capacity >= tokens: the dispatch of every routed token, values and gradients; below: the dense
    # mixture of the gates of each expert's first `capacity` tokens.
    torch.manual_seed(0)
    experts = [nn.Linear(5, 3).double() for _ in range(4)]
    x = _tensor(rng, (40, 5), requires_grad=True)
    logits = _tensor(rng, (40, 4), requires_grad=True)
    gates = tnn.topk_gates(logits, 2, regularization_strength=0.2)
    y = tnn.moe_dispatch(x, gates, experts, capacity=capacity)
    dense = _dense(x, _first_tokens(gates, capacity), experts)
    torch.testing.assert_close(y, dense, rtol=1e-13, atol=1e-13)
    if capacity >= 40:
        torch.testing.assert_close(y, tnn.moe_dispatch(x, gates, experts), rtol=1e-13, atol=1e-13)
    u = _tensor(rng, (40, 3))
    params = [x, logits, *experts[1].parameters()]
    ours_all = torch.autograd.grad(y, params, u, retain_graph=True)
    for ours, theirs in zip(ours_all, torch.autograd.grad(dense, params, u), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_dispatch_with_capacity_selects_the_padding_away():
    # An expert that overflows on token 0 (the padding's row) cannot reach the output: 0 * inf would be NaN.
    x = torch.tensor([[1e300], [1.0], [2.0]], dtype=torch.float64)
    gates = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    experts = [lambda t: t * t, lambda t: t + 1.0]
    y = tnn.moe_dispatch(x, gates, experts, capacity=3)
    torch.testing.assert_close(y, torch.tensor([[1e300 + 1.0], [1.0], [3.0]], dtype=torch.float64))


@pytest.mark.parametrize("capacity", [0, -2, 2.0, True, "4"])
def test_capacity_must_be_a_positive_int(capacity):
    x, gates = torch.ones(3, 2), torch.ones(3, 2)
    with pytest.raises(ValueError, match="`capacity` must be None or a positive int"):
        tnn.moe_dispatch(x, gates, [nn.Linear(2, 2)] * 2, capacity=capacity)
    with pytest.raises(ValueError, match="`capacity` must be None or a positive int"):
        tnn.MoE(2, 2, 1, capacity=capacity)


def test_moe_with_capacity_on_no_token():
    moe = tnn.MoE(6, 4, 2, 8, capacity=4)
    y = moe(torch.randn(0, 6))
    assert y.shape == (0, 6) and y.requires_grad


def test_dispatch_with_capacity_under_vmap_is_the_loop_over_groups(rng):
    # Fixed shapes: `torch.func.vmap` maps the dispatch over groups of tokens (the router's top-k inside),
    # values and per-group gradients equal to a loop; without a capacity the token counts set shapes,
    # which vmap cannot batch (torch's own error, data-dependent `nonzero`).
    torch.manual_seed(0)
    experts = [nn.Linear(5, 3).double() for _ in range(4)]
    x, logits = _tensor(rng, (3, 10, 5)), _tensor(rng, (3, 10, 4))

    def group(tokens, scores):
        return tnn.moe_dispatch(tokens, tnn.topk_gates(scores, 2, regularization_strength=0.2), experts, capacity=4)

    loop = torch.stack([group(x[i], logits[i]) for i in range(3)])
    torch.testing.assert_close(torch.func.vmap(group)(x, logits), loop, rtol=1e-13, atol=1e-13)
    per_group = torch.func.vmap(torch.func.grad(lambda t, s: group(t, s).sum(), argnums=(0, 1)))(x, logits)
    for i in range(3):
        t, s = x[i].clone().requires_grad_(), logits[i].clone().requires_grad_()
        for ours, theirs in zip((g[i] for g in per_group), torch.autograd.grad(group(t, s).sum(), [t, s]),
                                strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="nonzero"):
        torch.func.vmap(lambda t, s: tnn.moe_dispatch(t, tnn.topk_gates(s, 2), experts))(x, logits)


@requires_compile()
def test_moe_with_capacity_compiles_with_fullgraph(rng):
    # Without a capacity the token counts set shapes (graph breaks); with one the layer compiles whole.
    torch.manual_seed(0)
    moe = tnn.MoE(6, num_experts=4, k=2, hidden_features=8, capacity=5).double()
    x = _tensor(rng, (12, 6), requires_grad=True)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, moe(x), rtol=1e-13, atol=1e-13)
    (grad,) = torch.autograd.grad(got.sum(), [x])
    torch.testing.assert_close(grad, torch.autograd.grad(moe(x).sum(), [x])[0], rtol=1e-12, atol=1e-12)
