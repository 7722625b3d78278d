"""topk_jax.nn: pruning of pytrees, MoE router and dispatch, top-k loss; and agreement with topk_torch.nn.

The cross-framework tests (float64 on both sides) are skipped when torch is
not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import topk_jax as tk  # noqa: E402
from topk_jax import nn as jnn  # noqa: E402

DTYPES = [jnp.float32, jnp.float64]
DTYPE_IDS = ["float32", "float64"]


@pytest.fixture(autouse=True)
def x64():
    """Every test here may use float64; the previous setting is restored afterwards."""
    with jax.enable_x64(True):
        yield


def _array(rng: np.random.Generator, shape, dtype=jnp.float64) -> jax.Array:
    return jnp.asarray(rng.normal(size=shape), dtype=dtype)


def test_exposed_as_attribute_of_the_adapter():
    assert tk.nn is jnn
    assert sorted(jnn.__all__) == jnn.__all__


# --- pruning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("per_row", [False, True], ids=["tensor", "per-row"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_prune_array_shapes_counts_and_gradient(rng, dtype, per_row, hard):
    w = _array(rng, (6, 20), dtype)
    y = jnn.prune_array(w, 0.9, per_row=per_row, hard=hard, regularization_strength=0.05)
    assert isinstance(y, jax.Array)
    assert (y.shape, y.dtype) == (w.shape, dtype)
    k = 2 if per_row else 12
    assert jnn.num_kept(w, 0.9, per_row=per_row) == (6 * k if per_row else k)
    counts = (np.asarray(y).reshape(6, 20) if per_row else np.asarray(y).reshape(1, -1)) != 0
    assert (counts.sum(axis=1) >= k).all()
    if hard:
        assert (counts.sum(axis=1) == k).all()
    grad = jax.grad(lambda w: jnn.prune_array(w, 0.9, per_row=per_row, hard=hard).sum())(w)
    assert (grad.shape, grad.dtype) == (w.shape, dtype)
    if hard:
        np.testing.assert_array_equal(grad, np.ones(w.shape))  # straight-through


def test_prune_array_per_row_along_another_axis(rng):
    y = jnn.prune_array(_array(rng, (5, 3, 4)), 0.5, per_row=True, row_axis=1, hard=True)
    assert [int((y[:, i] != 0).sum()) for i in range(3)] == [10, 10, 10]


def test_topk_prune_selects_leaves_by_predicate_and_finalizes(rng):
    params = {
        "dense": {"kernel": _array(rng, (16, 8)), "bias": _array(rng, (8,))},
        "head": {"kernel": _array(rng, (8, 4)), "bias": _array(rng, (4,))},
    }
    pruned = jnn.topk_prune(params, 0.75, regularization_strength=0.01)
    assert jax.tree_util.tree_structure(pruned) == jax.tree_util.tree_structure(params)
    for name in ("dense", "head"):
        assert pruned[name]["bias"] is params[name]["bias"]
        assert int((pruned[name]["kernel"] != 0).sum()) >= jnn.num_kept(params[name]["kernel"], 0.75)
    only_head = jnn.topk_prune(params, 0.75, predicate=lambda path, leaf: "head" in jax.tree_util.keystr(path)
                               and leaf.ndim == 2)
    assert only_head["dense"]["kernel"] is params["dense"]["kernel"]
    final = jnn.finalize_pruning(params, 0.75, regularization_strength=0.01)
    assert int((final["dense"]["kernel"] != 0).sum()) == 32
    assert int((final["head"]["kernel"] != 0).sum()) == 8
    kept = np.asarray(final["dense"]["kernel"] != 0)
    np.testing.assert_array_equal(np.asarray(final["dense"]["kernel"])[kept], np.asarray(pruned["dense"]["kernel"])[kept])
    # Gradient to the dense leaves through the soft operator, and jit.
    loss = jax.jit(lambda p: sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(jnn.topk_prune(p, 0.75))))
    grads = jax.grad(loss)(params)
    assert grads["dense"]["kernel"].shape == (16, 8)
    np.testing.assert_allclose(grads["dense"]["bias"], 2 * params["dense"]["bias"])


def test_prune_rejects_bad_sparsity():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        jnn.prune_array(jnp.ones((3, 3)), 1.0)
    with pytest.raises(ValueError, match="keeps round"):
        jnn.prune_array(jnp.ones((3, 10)), 0.99, per_row=True)


# --- MoE -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("k", [1, 2])
def test_gates_shapes_sparsity_and_gradient(rng, dtype, hard, k):
    logits = _array(rng, (2, 7, 6), dtype)
    gates = jnn.topk_gates(logits, k, hard=hard)
    assert (gates.shape, gates.dtype) == (logits.shape, dtype)
    counts = np.asarray((gates != 0).sum(axis=-1))
    assert (counts == k).all() if hard else (counts >= k).all()
    grad = jax.grad(lambda z: jnn.topk_gates(z, k, hard=hard).sum())(logits)
    assert (grad.shape, grad.dtype) == (logits.shape, dtype)
    assert bool(jnp.isfinite(grad).all())


def test_routing_stats():
    stats = jnn.routing_stats(jnp.array([[0.5, 0.0, 0.2], [0.0, 0.0, 0.9]]))
    assert stats.experts_per_token.tolist() == [2, 1]
    assert stats.load.tolist() == [1, 0, 2]
    np.testing.assert_allclose(stats.gate_mass, [0.5, 0.0, 1.1])


def test_routing_stats_summaries(rng):
    gates = np.asarray(jnn.topk_gates(_array(rng, (3, 10, 6)), 2))
    stats = jnn.routing_stats(jnp.asarray(gates))
    # Independently: counts of non-zero gates per token (all leading axes) and per expert.
    nonzero = gates.reshape(-1, 6) != 0
    per_token, load = nonzero.sum(axis=1), nonzero.sum(axis=0)
    assert isinstance(stats.mean_experts_per_token, float) and isinstance(stats.load_imbalance, float)
    assert stats.mean_experts_per_token == pytest.approx(per_token.sum() / 30, rel=1e-15)
    assert stats.load_imbalance == pytest.approx(load.max() / (load.sum() / 6), rel=1e-15)
    balanced = jnn.routing_stats(jnp.eye(4))
    assert (balanced.mean_experts_per_token, balanced.load_imbalance) == (1.0, 1.0)
    assert np.isnan(jnn.routing_stats(jnp.zeros((3, 4))).load_imbalance)
    assert np.isnan(jnn.routing_stats(jnp.zeros((0, 4))).mean_experts_per_token)


def test_routing_stats_summaries_under_jit(rng):
    # Were a TracerArrayConversionError: the summaries are traced scalars inside jax.jit.
    gates = jnn.topk_gates(_array(rng, (3, 10, 6)), 2)
    eager = jnn.routing_stats(gates)
    summaries = jax.jit(lambda g: (jnn.routing_stats(g).mean_experts_per_token, jnn.routing_stats(g).load_imbalance))
    mean, imbalance = summaries(gates)
    assert float(mean) == pytest.approx(eager.mean_experts_per_token, rel=1e-6)
    assert float(imbalance) == pytest.approx(eager.load_imbalance, rel=1e-6)
    for empty in (jnp.zeros((3, 4)), jnp.zeros((0, 4)), jnp.zeros((3, 0))):
        assert np.isnan(float(summaries(empty)[1]))
    assert np.isnan(float(summaries(jnp.zeros((0, 4)))[0]))


def test_routing_stats_edge_shapes():
    no_experts = jnn.routing_stats(jnp.zeros((2, 3, 0)))  # was ZeroDivisionError inside reshape
    assert no_experts.experts_per_token.tolist() == [0] * 6 and no_experts.load.shape == (0,)
    assert no_experts.mean_experts_per_token == 0.0 and np.isnan(no_experts.load_imbalance)
    with pytest.raises(ValueError, match="`gates` must have at least one dimension"):
        jnn.routing_stats(jnp.float32(1.0))


def _dense(x, gates, params):
    return sum(gates[:, e: e + 1] * jnn.mlp_expert(p, x) for e, p in enumerate(params))


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_dispatch_equals_dense_and_runs_only_routed_tokens(rng, hard):
    params = jnn.init_moe(jax.random.key(0), 5, num_experts=6, hidden_features=7, out_features=3, dtype=jnp.float64)
    x = _array(rng, (16, 5))
    gates = jnn.topk_router(x, params["router"]["weight"], 2, bias=params["router"]["bias"], hard=hard)
    y = jnn.moe_dispatch(x, gates, jnn.mlp_expert, params["experts"])
    assert (y.shape, y.dtype) == ((16, 3), jnp.float64)
    np.testing.assert_allclose(y, _dense(x, gates, params["experts"]), rtol=1e-13, atol=1e-13)
    # Gradients equal those of the dense mixture with the same gates.
    def ours(xx, pp):
        return jnp.sum(jnn.moe_dispatch(xx, gates, jnn.mlp_expert, pp) ** 2)

    def dense(xx, pp):
        return jnp.sum(_dense(xx, gates, pp) ** 2)

    g1, g2 = jax.grad(ours, argnums=(0, 1))(x, params["experts"]), jax.grad(dense, argnums=(0, 1))(x, params["experts"])
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_dispatch_skips_idle_experts_and_pads_to_buckets(rng):
    params = jnn.init_moe(jax.random.key(3), 4, num_experts=3, hidden_features=5, dtype=jnp.float64)
    x = _array(rng, (20, 4))
    gates = jnp.zeros((20, 3)).at[:, 0].set(0.25).at[:3, 2].set(0.5)
    experts = [params["experts"][0], None, params["experts"][2]]  # expert 1 gets no token: never called
    y = jnn.moe_dispatch(x, gates, jnn.mlp_expert, experts)
    expected = 0.25 * jnn.mlp_expert(experts[0], x) + jnp.zeros_like(x).at[:3].set(0.5 * jnn.mlp_expert(experts[2], x[:3]))
    np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-13)
    assert [jnn._bucket(n, 20) for n in (1, 8, 9, 16, 17, 20)] == [8, 8, 16, 16, 20, 20]
    with pytest.raises(ValueError, match="fixed `capacity`"):
        jax.jit(lambda g: jnn.moe_dispatch(x, g, jnn.mlp_expert, params["experts"]))(gates)


def test_dispatch_with_capacity_under_jit(rng):
    params = jnn.init_moe(jax.random.key(1), 4, num_experts=3, hidden_features=5, dtype=jnp.float64)
    x = _array(rng, (12, 4))
    gates = jnn.topk_gates(_array(rng, (12, 3)), 1, hard=True)
    eager = jnn.moe_dispatch(x, gates, jnn.mlp_expert, params["experts"])
    jitted = jax.jit(lambda x, g, p: jnn.moe_dispatch(x, g, jnn.mlp_expert, p, capacity=12))
    np.testing.assert_allclose(jitted(x, gates, params["experts"]), eager, rtol=1e-13, atol=1e-13)
    # With capacity 2, each expert keeps its first two tokens (in token order) and drops the others.
    small = jax.jit(lambda x, g, p: jnn.moe_dispatch(x, g, jnn.mlp_expert, p, capacity=2))(x, gates, params["experts"])
    kept = np.zeros(gates.shape, bool)
    for e in range(3):
        kept[np.flatnonzero(np.asarray(gates[:, e]))[:2], e] = True
    np.testing.assert_allclose(small, _dense(x, jnp.where(kept, gates, 0), params["experts"]), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="capacity"):
        jnn.moe_dispatch(x, gates, jnn.mlp_expert, params["experts"], capacity=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_moe_layer_shapes_and_gradients(rng, dtype):
    params = jnn.init_moe(jax.random.key(2), 6, num_experts=4, hidden_features=8, out_features=5, dtype=dtype)
    x = _array(rng, (2, 4, 6), dtype)
    y, gates = jnn.moe_layer(params, x, 2)
    assert (y.shape, y.dtype, gates.shape, gates.dtype) == ((2, 4, 5), dtype, (2, 4, 4), dtype)
    grads = jax.grad(lambda p: jnp.sum(jnn.moe_layer(p, x, 2)[0]))(params)
    assert grads["router"]["weight"].shape == (6, 4)
    assert all(leaf.dtype == dtype for leaf in jax.tree_util.tree_leaves(grads))


# --- top-k loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_topk_loss_shapes_dtypes_and_formula(rng, dtype, reduction):
    scores = _array(rng, (2, 6, 12), dtype)
    labels = jnp.asarray(rng.integers(12, size=(2, 6)))
    kw = {"regularization_strength": 0.5, "p": 2.0}
    loss = jnn.topk_loss(scores, labels, k=[1, 3], k_weights=[1.0, 3.0], ce_weight=0.3, eps=0.05,
                         reduction=reduction, **kw)
    assert loss.dtype == dtype
    assert loss.shape == ((2, 6) if reduction == "none" else ())
    idx = labels[..., None]
    ce = -jnp.take_along_axis(jax.nn.log_softmax(scores), idx, -1)[..., 0]
    member = sum(w * jnp.take_along_axis(tk.soft_topk_mask(scores, k, **kw), idx, -1)[..., 0]
                 for k, w in ((1, 0.25), (3, 0.75)))
    expected = 0.3 * ce - 0.7 * jnp.log(0.05 + 0.95 * member)
    expected = {"mean": expected.mean(), "sum": expected.sum(), "none": expected}[reduction]
    np.testing.assert_allclose(loss, expected, rtol=1e-5 if dtype == jnp.float32 else 1e-12)
    grad = jax.grad(lambda s: jnn.topk_loss(s, labels, k=3).sum())(scores)
    assert (grad.shape, grad.dtype) == (scores.shape, dtype)


def test_topk_loss_gradient_outside_the_support_comes_from_cross_entropy():
    scores = jnp.array([[5.0, 4.0, 3.0, -5.0]])
    labels = jnp.array([3])
    np.testing.assert_array_equal(jax.grad(lambda s: jnn.topk_loss(s, labels, k=2, ce_weight=0.0))(scores), 0.0)
    grad = jax.grad(lambda s: jnn.topk_loss(s, labels, k=2, ce_weight=0.5))(scores)
    assert float(grad[0, 3]) < 0


# --- agreement with topk_torch.nn (float64) ----------------------------------------------------------


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def tnn(torch):
    from topk_torch import nn

    return nn


@pytest.mark.parametrize("per_row", [False, True], ids=["tensor", "per-row"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_pruning_agrees_with_torch(rng, torch, tnn, per_row, hard):
    w = rng.normal(size=(7, 30)) * 0.2
    u = rng.normal(size=(7, 30))
    kw = {"per_row": per_row, "hard": hard, "regularization_strength": 0.02, "p": 4.0 / 3.0}
    pruning = tnn.TopkPruning(0.8, **kw)
    wt = torch.tensor(w, requires_grad=True)
    yt = pruning(wt)
    yt.backward(torch.tensor(u))
    yj, vjp = jax.vjp(lambda w: jnn.prune_array(w, 0.8, **kw), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(yj), yt.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(u))[0]), wt.grad.numpy(), rtol=1e-10, atol=1e-12)
    final_j = jnn.finalize_pruning({"w": jnp.asarray(w)}, 0.8, **kw)["w"]
    np.testing.assert_array_equal(np.asarray(final_j), pruning.finalize(wt).numpy())
    assert int((final_j != 0).sum()) == pruning.num_kept(wt) == jnn.num_kept(w, 0.8, per_row=per_row)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_moe_agrees_with_torch(rng, torch, tnn, hard):
    torch.manual_seed(0)
    moe = tnn.MoE(6, num_experts=5, k=2, hidden_features=8, out_features=4, hard=hard, regularization_strength=0.05)
    moe = moe.double()
    params = {
        "router": {"weight": jnp.asarray(moe.router.linear.weight.detach().numpy().T),
                   "bias": jnp.asarray(moe.router.linear.bias.detach().numpy())},
        "experts": [
            {"w1": jnp.asarray(e[0].weight.detach().numpy().T), "b1": jnp.asarray(e[0].bias.detach().numpy()),
             "w2": jnp.asarray(e[2].weight.detach().numpy().T), "b2": jnp.asarray(e[2].bias.detach().numpy())}
            for e in moe.experts
        ],
    }
    x = rng.normal(size=(2, 4, 6))
    xt = torch.tensor(x, requires_grad=True)
    yt, gt = moe(xt, return_gates=True)
    (yt**2).sum().backward()
    yj, gj = jnn.moe_layer(params, jnp.asarray(x), 2, hard=hard, regularization_strength=0.05)
    np.testing.assert_allclose(np.asarray(gj), gt.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(yj), yt.detach().numpy(), rtol=1e-12, atol=1e-13)
    stats_t, stats_j = tnn.routing_stats(gt), jnn.routing_stats(gj)
    assert stats_t.load.tolist() == stats_j.load.tolist()
    assert stats_t.experts_per_token.reshape(-1).tolist() == stats_j.experts_per_token.tolist()
    assert stats_j.mean_experts_per_token == stats_t.mean_experts_per_token
    assert stats_j.load_imbalance == stats_t.load_imbalance
    grad_x = jax.grad(lambda x: jnp.sum(jnn.moe_layer(params, x, 2, hard=hard, regularization_strength=0.05)[0] ** 2))(
        jnp.asarray(x)
    )
    np.testing.assert_allclose(np.asarray(grad_x), xt.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0], ids=["p=4/3", "p=2"])
def test_topk_loss_agrees_with_torch(rng, torch, tnn, p):
    scores = rng.normal(size=(16, 20)) * 2
    labels = rng.integers(20, size=16)
    kw = {"k": [1, 5], "k_weights": [0.3, 0.7], "ce_weight": 0.4, "eps": 0.02, "regularization_strength": 0.7, "p": p}
    st = torch.tensor(scores, requires_grad=True)
    lt = tnn.topk_loss(st, torch.tensor(labels), **kw)
    lt.backward()
    lj, gj = jax.value_and_grad(lambda s: jnn.topk_loss(s, jnp.asarray(labels), **kw))(jnp.asarray(scores))
    np.testing.assert_allclose(float(lj), lt.item(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gj), st.grad.numpy(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ edge cases found by an audit


def test_moe_dispatch_padding_adds_nothing_to_token_0():
    # The padding rows of an expert's buffer gather token 0 and were multiplied by a zero weight: an
    # expert output that overflows there gave 0 * inf = NaN in token 0, routed elsewhere.
    x = jnp.array([[1e308], [1.0], [2.0]])
    gates = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = jnn.moe_dispatch(x, gates, lambda w, t: t * w, [jnp.float64(1.0), jnp.float64(10.0)])
    np.testing.assert_array_equal(np.asarray(y).ravel(), [1e308, 10.0, 20.0])


def test_moe_layer_with_capacity_and_no_token():
    # A buffer of `capacity` rows gathered token 0, which is not there (an XLA gather error).
    params = jnn.init_moe(jax.random.key(0), 6, 4, 8)
    for fn in (jnn.moe_layer, jax.jit(jnn.moe_layer, static_argnames=("k", "capacity"))):
        y, gates = fn(params, jnp.zeros((0, 6)), k=2, capacity=4)
        assert y.shape == (0, 6) and gates.shape == (0, 4)


@pytest.mark.parametrize(("shape", "per_row"), [((0, 4), False), ((4, 0), True), ((0, 4), True)])
def test_pruning_an_empty_weight_returns_it(shape, per_row):
    w = jnp.zeros(shape)
    assert jnn.prune_array(w, 0.5, per_row=per_row).shape == shape
    assert jnn.num_kept(w, 0.5, per_row=per_row) == 0
    final = jnn.finalize_pruning({"w": w, "v": jnp.ones((2, 4))}, 0.5, per_row=per_row)
    assert final["w"].shape == shape and int((final["v"] != 0).sum()) == 4


def test_topk_loss_labels_outside_the_classes():
    # Eagerly a ValueError, as topk_torch; under jit (which cannot raise on values) NaN for those samples
    # only.  A label of -1 read the last class (JAX wraps negative indices), one of 5 gave NaN silently.
    scores = jnp.array([[0.3, 2.0, -1.0, 0.5, 1.2], [0.3, 2.0, -1.0, 0.5, 1.2]])
    for label in (-1, 5, -100):
        with pytest.raises(ValueError, match=r"`labels` must be class indices in \[0, 5\)"):
            jnn.topk_loss(scores, jnp.array([label, 1]), k=2)
    jitted = jax.jit(lambda s, y: jnn.topk_loss(s, y, k=2, reduction="none"))(scores, jnp.array([-1, 1]))
    assert np.isnan(jitted[0]) and np.isfinite(jitted[1])
    np.testing.assert_allclose(jitted[1], jnn.topk_loss(scores[1:], jnp.array([1]), k=2), rtol=1e-12)
    with pytest.raises(TypeError, match="`labels` must be integer class indices"):
        jnn.topk_loss(scores, jnp.array([1.0, 2.0]), k=2)


def test_pruning_row_axis_out_of_range_names_it():
    # ("tuple index out of range" before.)
    with pytest.raises(ValueError, match=r"`row_axis` must be an int in \[-2, 1\]"):
        jnn.prune_array(jnp.ones((4, 5)), 0.5, per_row=True, row_axis=3)


def test_init_moe_with_no_hidden_feature():
    # As torch.nn.Linear initializes a layer of fan-in 0 (bias bound 0); it divided by zero.
    params = jnn.init_moe(jax.random.key(0), 6, 4, hidden_features=0)
    assert params["experts"][0]["w1"].shape == (6, 0) and not params["experts"][0]["b2"].any()
    y, _ = jnn.moe_layer(params, jnp.ones((3, 6)), k=2)
    assert y.shape == (3, 6)


def test_default_predicate_skips_integer_leaves():
    # An integer 2-d leaf (indices kept in the tree) was picked and failed on its dtype.
    params = {"w": jnp.ones((4, 5)), "ids": jnp.arange(20).reshape(4, 5)}
    pruned = jnn.topk_prune(params, 0.5)
    assert pruned["ids"] is params["ids"]
    assert int((jnn.finalize_pruning(params, 0.5)["w"] != 0).sum()) == 10
