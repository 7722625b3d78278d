"""method="auto" (the rule of docs/methods.md), method dispatch and the iteration controls."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

import topk_core as tc
from topk_core import _pav_path
from topk_core._agnostic.regularizer import conjugate_exponent
from topk_core._api import auto_method, resolve_method

from ._method_backends import BACKENDS, backend_context, cuda_torch
from ._oracles import mp_threshold_mag_row, mp_threshold_mask_row
from ._subprocess import run_python

SOFT = [tc.soft_topk_mask, tc.soft_topk_mag]
ids = lambda f: f.__name__  # noqa: E731
X = np.arange(12.0).reshape(3, 4)

EXPECTED_AUTO = {"numpy": "pav", "torch": "pav", "jax": "pav", "array_api_strict": "threshold"}


@pytest.mark.parametrize("name", BACKENDS)
def test_auto_rule_per_backend_on_the_cpu(name):
    with backend_context(name) as b:
        assert auto_method(b.to(X)) == EXPECTED_AUTO[name]


@pytest.mark.parametrize("name", BACKENDS)
def test_auto_runs_in_the_input_namespace_and_matches_pav(name, rng, operator):
    x = rng.normal(size=(7, 10))
    with backend_context(name) as b:
        xb = b.to(x)
        y, res = getattr(tc, f"soft_topk_{operator}_forward")(xb, 3)
        b.assert_like(y, xb)
        b.assert_like(res.gprime, xb)
        want = getattr(tc, f"soft_topk_{operator}")(x, 3, method="pav")
        np.testing.assert_allclose(b.back(y), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["threshold", "dykstra"])
def test_array_api_methods_keep_residuals_in_the_namespace(method, operator):
    xs = pytest.importorskip("array_api_strict")
    x = xs.asarray(np.random.default_rng(1).normal(size=(4, 6)))
    _, res = getattr(tc, f"soft_topk_{operator}_forward")(x, 2, p=2.0, method=method)
    for field in res:
        assert field is None or isinstance(field, type(x))


def test_auto_runs_the_threshold_method_above_p_8_where_pav_is_not_exact():
    # PAV decides its blocks on float keys: on 200 normal rows its mask missed k by 2e-2 (rows of 9, k = 3,
    # l = 0.1, p = 200) and its magnitude was 0.67 off (rows of 64, k = 8, l = 1, p = 100; one row each);
    # "auto" is exact there by running the threshold method, and an explicit "pav" is refused (up to commit
    # b606d97 it ran; up to 62fd162 the line was at p = 4).  PAV missed at far smaller p before commit 4a787a8
    # (p = 5: 3.8e-5, mask; p = 7: 1.8e-3, magnitude), before its solve below the next key (p = 10: 4.5e-3
    # and 1.9e-2 on rows scaled by e^u) and before its splits toward a key in the key's frame (p = 50: 1.2e-2
    # on normal rows of 9, 0.41 on rows of 64 at l = 100).  Oracles: the thresholds in 600 digits (u = l y^(p-1)
    # below a key).
    for p in (4.0, 5.0, 8.0, 8.0 + 1e-9, 10.0):
        assert resolve_method(X, p) == ("pav" if p <= 8.0 else "threshold")
    assert resolve_method(X, 8.0, "pav") == "pav"
    for p in (8.0 + 1e-9, 20.0):
        with pytest.raises(ValueError, match=r"method='pav' is exact for p <= 8 only; got p = .*'threshold'"):
            resolve_method(X, p, "pav")
    cases = [("mask", mp_threshold_mask_row, 9, 3, 0.1, 200.0), ("mag", mp_threshold_mag_row, 64, 8, 1.0, 100.0)]
    for op, oracle, n, k, lam, p in cases:
        x = np.random.default_rng(5).normal(size=(200, n))
        # PAV's kernel itself (the public method refuses these p).
        pav = getattr(_pav_path, f"pav_{op}")(x, k, lam, conjugate_exponent(p), with_residuals=False)[0]
        auto = getattr(tc, f"soft_topk_{op}")(x, k, regularization_strength=lam, p=p)
        i = int(np.argmax(np.abs(pav - auto).max(axis=-1)))
        assert np.abs(pav[i] - auto[i]).max() > 1e-3  # PAV's error, still there
        np.testing.assert_allclose(auto[i], oracle(x[i], k, lam, p, digits=600), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_adapters_auto_runs_the_threshold_method_above_p_8(name):
    # p = 10 on normal rows: the adapters' "auto" meets k, and their explicit "pav" is refused; at p = 8 they
    # run PAV, which meets k too.
    x = np.random.default_rng(6).normal(size=(200, 64))
    with backend_context(name) as b:
        adapter = importlib.import_module(f"topk_{name}")
        y = b.back(adapter.soft_topk_mask(b.to(x), 8, regularization_strength=1.0, p=10.0))
        with pytest.raises(ValueError, match="method='pav' is exact for p <= 8 only"):
            adapter.soft_topk_mask(b.to(x), 8, regularization_strength=1.0, p=10.0, method="pav")
        y_pav = b.back(adapter.soft_topk_mask(b.to(x), 8, regularization_strength=1.0, p=8.0, method="pav"))
    assert np.abs(y.sum(-1) - 8).max() <= 1e-12
    assert np.abs(y_pav.sum(-1) - 8).max() <= 1e-12


def test_resolve_method_for_adapters():
    assert resolve_method(X, 4.0 / 3.0) == "pav"
    assert resolve_method(X, 2.0, "dykstra", max_iter=5) == "dykstra"
    assert resolve_method(X, 3.0, "threshold", tol=1e-9) == "threshold"
    with pytest.raises(ValueError, match="p = 2 operators only"):
        resolve_method(X, 3.0, "dykstra")


@pytest.mark.parametrize("fn", SOFT, ids=ids)
@pytest.mark.parametrize("method", ["threshold", "dykstra"])
@pytest.mark.parametrize(("controls", "error", "match"), [
    ({"max_iter": 0}, ValueError, r"`max_iter` must be an int >= 1 or None.*got 0"),
    ({"max_iter": -3}, ValueError, r"`max_iter` must be an int >= 1.*got -3"),
    ({"max_iter": 2.5}, TypeError, r"`max_iter` must be a Python int >= 1 or None; got 2\.5"),
    ({"max_iter": True}, TypeError, "`max_iter`"),
    ({"max_iter": "10"}, TypeError, "`max_iter`"),
    ({"tol": 0.0}, ValueError, r"`tol` must be a finite float > 0.*got 0\.0"),
    ({"tol": -1e-6}, ValueError, "`tol` must be a finite float > 0"),
    ({"tol": np.inf}, ValueError, "`tol` must be finite"),
    ({"tol": np.nan}, ValueError, "`tol` must be finite"),
    ({"tol": "1e-6"}, TypeError, "`tol` must be a real number"),
])
def test_bad_iteration_controls(fn, method, controls, error, match):
    with pytest.raises(error, match=match):
        fn(X, 2, p=2.0, method=method, **controls)


@pytest.mark.parametrize("fn", SOFT, ids=ids)
@pytest.mark.parametrize("method", ["threshold", "dykstra"])
def test_good_iteration_controls_are_accepted(fn, method):
    want = fn(X, 2, p=2.0, method="pav")
    got = fn(X, 2, p=2.0, method=method, max_iter=np.int64(500), tol=1e-9)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("fn", SOFT, ids=ids)
def test_auto_refuses_iteration_controls_whatever_it_picks(fn):
    xs = pytest.importorskip("array_api_strict")
    for x in (X, xs.asarray(X)):
        with pytest.raises(ValueError, match=r"method='auto' picks '(pav|threshold)' here and takes neither"):
            fn(x, 2, max_iter=10)


def test_controls_are_checked_before_any_computation(monkeypatch):
    import topk_core._api as api

    def boom(*args, **kwargs):
        raise AssertionError("solver called before validation")

    monkeypatch.setitem(api._AGNOSTIC, ("threshold", "mask"), boom)
    with pytest.raises(ValueError, match="`tol`"):
        tc.soft_topk_mask(X, 2, method="threshold", tol=-1.0)


def test_methods_doc_states_the_rule():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
    text = doc.read_text()
    assert "auto" in text and "threshold" in text and "pav" in text and "np.sort" in text


@pytest.mark.gpu
def test_auto_picks_threshold_on_cuda(operator):
    torch = cuda_torch()
    x = torch.randn(32, 17, dtype=torch.float64, device="cuda")
    assert auto_method(x) == "threshold"
    y, res = getattr(tc, f"soft_topk_{operator}_forward")(x, 4)
    assert y.device == x.device and res.gprime.device == x.device
    want = getattr(tc, f"soft_topk_{operator}")(x.cpu(), 4, method="pav")
    np.testing.assert_allclose(y.cpu().numpy(), want.numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["threshold", "dykstra"])
def test_empty_batch(method, operator):
    for shape in [(0, 5), (2, 0, 5)]:
        y, res = getattr(tc, f"soft_topk_{operator}_forward")(np.zeros(shape), 2, p=2.0, method=method)
        assert y.shape == shape and res.gprime.shape == (0, 5)


_JIT_DISABLED = """
import json, sys
from importlib.util import find_spec
import numpy as np
x = np.array(json.loads(sys.argv[1]))
u = np.cos(np.arange(x.size)).reshape(x.shape)
out = {}
import topk_numpy
for op in ("mask", "mag"):
    y, vjp_fn = getattr(topk_numpy, f"soft_topk_{op}_vjp")(x, 3)
    out[f"numpy {op}"] = [y.tolist(), vjp_fn(u).tolist()]
try:
    topk_numpy.soft_topk_mask(x, 3, method="pav")
except ValueError as error:
    out["pav"] = str(error)
# The adapters whose framework is installed (the floor scripts run without JAX).
if find_spec("torch"):
    import torch, topk_torch
    leaf = torch.tensor(x, requires_grad=True)
    y = topk_torch.soft_topk_mag(leaf, 3)
    y.backward(torch.tensor(u))
    out["torch mag"] = [y.tolist(), leaf.grad.tolist()]
if find_spec("jax"):
    import jax
    jax.config.update("jax_enable_x64", True)
    import topk_jax
    y, vjp_fn = jax.vjp(lambda v: topk_jax.soft_topk_mask(v, 3), jax.numpy.asarray(x))
    out["jax mask"] = [np.asarray(y).tolist(), np.asarray(vjp_fn(jax.numpy.asarray(u))[0]).tolist()]
print(json.dumps(out))
"""


def test_numba_jit_disabled_runs_the_threshold_method(rng):
    """With NUMBA_DISABLE_JIT=1 (set to debug other Numba code) the PAV kernels cannot run (an intrinsic has no
    Python form: "<intrinsic prefer_wide_vectors> is not usable in pure-python"): "auto" takes the threshold
    method in every adapter, with the numbers of PAV here, and an explicit "pav" is refused by name."""
    x = rng.normal(size=(4, 9))
    u = np.cos(np.arange(x.size)).reshape(x.shape)
    output = run_python(_JIT_DISABLED, json.dumps(x.tolist()), env={"NUMBA_DISABLE_JIT": "1"})
    got = json.loads(output.strip().splitlines()[-1])
    assert "NUMBA_DISABLE_JIT" in got.pop("pav")
    for key, (y, product) in got.items():
        op = key.split()[1]
        y_pav, residuals = getattr(tc, f"soft_topk_{op}_forward")(x, 3, method="pav")
        np.testing.assert_allclose(y, y_pav, atol=1e-10, err_msg=key)
        np.testing.assert_allclose(product, getattr(tc, f"{op}_vjp_from_residuals")(residuals, u), atol=1e-9,
                                   err_msg=key)
