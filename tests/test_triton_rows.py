"""The threshold method's Triton kernels for short rows (`topk_core._triton_rows`, `topk_torch._triton_rows`).

Without a GPU the kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, which tests/conftest.py sets there); on a machine
with CUDA the same tests run the compiled kernels on the device.  References
are independent: the Numba PAV of the core on the host, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton", minversion="3.2")

import topk_core  # noqa: E402
import topk_numpy as tn  # noqa: E402
import topk_torch as tt  # noqa: E402
from topk_core._agnostic.regularizer import conjugate_exponent  # noqa: E402
from topk_torch import _triton_rows  # noqa: E402

from ._oracles import mp_threshold_mag_row, mp_threshold_mask_row  # noqa: E402
from ._rows import rows_of_kind, spanning_row  # noqa: E402
from ._torch_helpers import quiet_lazy_torch_imports, requires_compile  # noqa: E402
from .conftest import P_IDS, P_VALUES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
quiet_lazy_torch_imports()

STRENGTH = 0.1
# Random cases of the property test below: Triton's interpreter, which runs the kernels without a GPU,
# takes about a second per case (40 took 43 s of a CI run); the fixed cases above cover every p, kind
# of row and operator there.
PROPERTY_EXAMPLES = 40 if DEVICE == "cuda" else 12


@pytest.fixture
def kernels_on(monkeypatch):
    """The threshold method takes the kernels on this test's device."""
    monkeypatch.setenv(_triton_rows.ENVIRONMENT_VARIABLE, "always")
    monkeypatch.setattr(_triton_rows, "_failures", [])


def _rows(rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "zeros":
        x = rng.normal(size=(12, 20))
        return np.where(rng.random(x.shape) < 0.6, 0.0, x)
    if kind == "huge":
        return np.round(rng.normal(size=(12, 20))) * 1e24 + 1e24  # ties at a huge value
    if kind == "tiny":
        return rng.normal(size=(12, 20)) * 1e-20
    return rows_of_kind(rng, 12, 20, kind, np.float64)


def _launch(kind: str, x: np.ndarray, k: int, p: float, lam: float = STRENGTH):
    status, y, *res = _triton_rows._launch(kind, torch.from_numpy(x).to(DEVICE), k, lam, conjugate_exponent(p), True)
    return status.cpu().numpy() < 0, y.cpu().numpy(), [r.cpu().numpy() for r in res]


def _pav(operator: str, x: np.ndarray, k: int, p: float, lam: float = STRENGTH):
    forward = getattr(topk_core, f"soft_topk_{operator}_forward")
    y, res = forward(x, k, regularization_strength=lam, p=p, method="pav")
    return np.asarray(y), res


@pytest.mark.parametrize("p", P_VALUES, ids=P_IDS)
@pytest.mark.parametrize("rows", ["normal", "ties", "zeros", "huge", "tiny", "spread", "offset"])
@pytest.mark.parametrize("operator", ["mask", "mag"])
def test_kernel_agrees_with_pav_in_float64(operator, rows, p, rng):
    x = _rows(rng, rows)
    k = 3 if rows in ("normal", "huge", "offset") else x.shape[1] // 2
    y0, res0 = _pav(operator, x, k, p)
    flags, y, res = _launch(operator, x, k, p)
    assert not flags.any(), "finite rows were handed back"
    np.testing.assert_allclose(y, y0, rtol=0, atol=1e-10 * np.abs(y0).max())
    # The residuals: the same free set, g' to 1e-8 relative (for p = 3 it is steep next to the
    # threshold), the same set codes and offsets.
    g0 = np.asarray(res0.gprime)
    np.testing.assert_array_equal(res[0] > 0, g0 > 0)
    np.testing.assert_allclose(res[0], g0, rtol=1e-8, atol=0)
    if operator == "mag":
        np.testing.assert_array_equal(res[1], np.asarray(res0.codes))
        np.testing.assert_array_equal(res[2], np.broadcast_to(np.asarray(res0.offset), res[2].shape))


@pytest.mark.parametrize("operator", ["mask", "mag"])
@pytest.mark.parametrize("p", [4.0 / 3.0, 2.0, 3.0], ids=["p=4/3", "p=2", "p=3"])
def test_float32_rows_agree_with_float64_pav(operator, p, rng):
    x = rows_of_kind(rng, 16, 64, "normal", np.float32)
    y0, _ = _pav(operator, x.astype(np.float64), 6, p)
    flags, y, res = _launch(operator, x, 6, p)
    assert y.dtype == np.float32 and res[0].dtype == np.float32 and not flags.any()
    np.testing.assert_allclose(y, y0, rtol=0, atol=1e-6 * np.abs(y0).max())


def test_rows_spanning_many_orders_agree_with_pav(p):
    x = np.stack([spanning_row(seed, 30.0, 24) for seed in range(4)])
    for operator in ("mask", "mag"):
        y0, _ = _pav(operator, x, 5, p)
        flags, y, _ = _launch(operator, x, 5, p)
        assert not flags.any()
        np.testing.assert_allclose(y, y0, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("p", [4.0 / 3.0, 1.5, 2.0, 3.0, 5.0], ids=["p=4/3", "p=3/2", "p=2", "p=3", "p=5"])
def test_magnitude_rows_far_below_their_largest_key(p, kernels_on):
    # Rows whose k-th place lies hundreds of orders below the largest key.  For p > 2 the kernel's
    # saturation width l t^(1/(q-1)) underflowed to 0 at such thresholds, and every key at or below t
    # (r = 0 >= w = 0) counted as saturated: it kept every non-zero entry and reported the row
    # converged.  At p = 4/3 and 3/2 it hands them back to the Array-API method, which lost them in its
    # frame (`threshold._mag_deep_frames`).  Through the public operator, against PAV.
    x = np.array([[1e250, 1e-250, 3e-251, -2e-251, 5e-251, 0.0], [1e300, -1e100, 5e-10, 1e-300, 2e-301, -3e-301],
                  [0.3, -1.2, 0.8, 2.0, -0.1, 0.5]])
    got = tt.soft_topk_mag(torch.from_numpy(x).to(DEVICE), 3, p=p, method="threshold", regularization_strength=1.0)
    want, _ = _pav("mag", x, 3, p, lam=1.0)
    bad = np.abs(got.cpu().numpy() - want) > 1e-12 * np.abs(x)
    assert not bad.any(), (got.cpu().numpy()[bad], want[bad])


def test_free_entry_rounded_to_saturation_keeps_the_offset():
    # `test_threshold.test_mag_free_entry_rounded_to_saturation_keeps_the_jacobian`'s row: k entries read
    # as saturated next to free ones, the smallest is free (offset k - |A| = 1, not 0).
    from .test_threshold import SPANNING_MAG_CODES, SPANNING_MAG_ROW

    flags, _, (_, codes, offset) = _launch("mag", np.array([SPANNING_MAG_ROW]), 3, 1.25, lam=0.01)
    assert not flags.any()
    np.testing.assert_array_equal(codes, [SPANNING_MAG_CODES])
    np.testing.assert_array_equal(offset.ravel(), [1.0])
    # The mask's (`test_mask_free_entry_rounded_to_saturation_keeps_the_jacobian`): y = 1 - 1e-18, g' = 4.
    flags, _, (gp,) = _launch("mask", np.array([[1.0, 1e-5, 2e-5, 3e-5, -1.0]]), 1, 1.25, lam=1.0)
    assert not flags.any()
    np.testing.assert_allclose(gp[0, 0], 4.0, rtol=1e-12)


def test_non_unique_threshold_gives_an_empty_free_set():
    # Spec section 6: the k entries clear of the rest by a saturating gap; the exact VJP is 0.
    x = np.array([[3.0, 1.0, 1.0, -2.0]])
    _, y, (gp,) = _launch("mask", x, 1, 2.0)
    np.testing.assert_array_equal(y, [[1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(gp, 0.0)
    # Magnitude (keys 30, 20, 10, 10): the second key still saturates at the third one's level.
    _, y, (gp, codes, _) = _launch("mag", x * 10, 2, 2.0)
    np.testing.assert_array_equal(y, [[30.0, 0.0, 0.0, -20.0]])
    np.testing.assert_array_equal(gp, 0.0)
    np.testing.assert_array_equal(codes, [[2, 0, 0, 2]])


@pytest.mark.parametrize("nonzero", [1, 3])
def test_magnitude_rows_with_at_most_k_non_zero_entries_return_x(nonzero):
    x = np.zeros((2, 6))
    x[:, :nonzero] = [[2.0, -1.0, 0.5][:nonzero]] * 2
    _, res0 = _pav("mag", x, 3, 4.0 / 3.0)
    flags, y, (gp, codes, offset) = _launch("mag", x, 3, 4.0 / 3.0)
    assert not flags.any()
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(gp, 0.0)
    np.testing.assert_array_equal(codes, np.asarray(res0.codes))
    np.testing.assert_array_equal(offset, np.broadcast_to(np.asarray(res0.offset), offset.shape))


@pytest.mark.parametrize("operator", ["mask", "mag"])
def test_public_operators_take_the_kernel_and_hand_back_non_finite_rows(operator, kernels_on, monkeypatch, rng):
    launches = []
    launch = _triton_rows._launch
    monkeypatch.setattr(_triton_rows, "_launch", lambda *a, **kw: launches.append(a[0]) or launch(*a, **kw))
    x = rng.normal(size=(6, 12))
    x[1, 4], x[3, 0], x[4, 2] = np.nan, np.inf, -np.inf
    u = rng.normal(size=x.shape)
    xt = torch.tensor(x, device=DEVICE, requires_grad=True)
    y = getattr(tt, f"soft_topk_{operator}")(xt, 4, method="threshold")
    (grad,) = torch.autograd.grad(y, xt, torch.tensor(u, device=DEVICE))
    assert launches == [operator]
    y0, vjp = getattr(tn, f"soft_topk_{operator}_vjp")(x, 4, method="pav")
    np.testing.assert_allclose(y.detach().cpu().numpy(), y0, rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(grad.cpu().numpy(), vjp(u), rtol=0, atol=1e-10, equal_nan=True)
    # Forward only (no residuals): the same values.
    with torch.no_grad():
        y_value = getattr(tt, f"soft_topk_{operator}")(xt, 4, method="threshold")
    np.testing.assert_array_equal(y_value.cpu().numpy(), y.detach().cpu().numpy())


def test_rows_that_do_not_converge_are_solved_by_the_array_api_method(kernels_on, monkeypatch, rng):
    monkeypatch.setattr(_triton_rows.kernels(), "MAX_ITER", 1)
    x = rng.normal(size=(5, 16))
    flags, _, _ = _launch("mag", x, 3, 4.0 / 3.0, lam=1.0)  # l = 1: no row has a non-unique threshold
    assert flags.all()
    y = tt.soft_topk_mag(torch.tensor(x, device=DEVICE), 3, regularization_strength=1.0, method="threshold")
    np.testing.assert_allclose(y.cpu().numpy(), _pav("mag", x, 3, 4.0 / 3.0, lam=1.0)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("operator", "x", "k", "p", "lam"), [
    # p = 50 mask: entries at y ~ 0.07 lie u = l y^49 ~ 1e-58 below their key, under its rounding in the
    # kernel's frame (that of the k-th key): the kernel's sums missed k by up to 0.5.
    ("mask", np.random.default_rng(5).normal(size=(200, 9))[[60, 125]], 3, 50.0, 1.0),
    # p = 5 magnitude, tied keys near 1e-110: r = l (y t)^4 ~ 1e-440 in every frame; the kernel kept or
    # dropped the ties whole (107% of the largest output off).
    ("mag", np.array([[-5.0, 5.0, 5.0, -4.0, -2.0, 2.0, -5.0]]) * 1e-110, 3, 5.0, 0.5),
])
def test_rows_no_float_threshold_resolves_are_handed_back(operator, x, k, p, lam, kernels_on):
    # For p > 2 a row whose sum(y) misses k by more than 512 ulps at the kernel's root is handed back; the
    # Array-API method interpolates it between its bracket's ends.  Oracle: the threshold in 450 digits.
    flags, _, _ = _launch(operator, x, k, p, lam)
    assert flags.all()
    y = getattr(tt, f"soft_topk_{operator}")(torch.tensor(x, device=DEVICE), k, p=p, regularization_strength=lam,
                                             method="threshold").cpu().numpy()
    oracle = mp_threshold_mask_row if operator == "mask" else mp_threshold_mag_row
    for row, got in zip(x, y, strict=True):
        want = oracle(row, k, lam, p, digits=450)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("p", [4.0, 5.0, 10.0])
@pytest.mark.parametrize("operator", ["mask", "mag"])
def test_rows_above_p_2_are_solved_next_to_their_key(operator, p, rng):
    # For p > 2 an ulp of the threshold moves the output of a key next to it by far more than an ulp: the
    # kernels solve such rows again in that key's frame (the mask relative to the k-th key alone was
    # 3e-13 off at p = 4 and 2e-2 at p = 10; the magnitude 2e-13 and, with a saturation width as the
    # scale of its steps, 1.5e-2).  The rows the kernel keeps, against the threshold in 100 digits.
    x = rng.normal(size=(16, 24))
    flags, y, _ = _launch(operator, x, 4, p, 1.0)
    assert flags.sum() <= 1
    oracle = mp_threshold_mask_row if operator == "mask" else mp_threshold_mag_row
    for row, got in zip(x[~flags], y[~flags], strict=True):
        np.testing.assert_allclose(got, oracle(row, 4, 1.0, p, digits=100), rtol=0, atol=1e-13)


def test_rows_of_moderate_p_stay_in_the_kernel(rng):
    # The hand-back above is for rows that no float threshold resolves, not a cost on ordinary ones.
    x = rng.normal(size=(64, 32))
    for operator in ("mask", "mag"):
        for p in (2.5, 3.0, 4.0):
            flags, _, _ = _launch(operator, x, 4, p, 1.0)
            assert not flags.any(), (operator, p)


def test_a_kernel_that_fails_leaves_the_array_api_route_with_a_warning(kernels_on, monkeypatch, rng):
    def fail(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_triton_rows, "_launch", fail)
    x = torch.tensor(rng.normal(size=(3, 10)), device=DEVICE)
    with pytest.warns(RuntimeWarning, match="Triton kernel of the threshold method failed"):
        y = tt.soft_topk_mask(x, 2, method="threshold")
    assert _triton_rows._failures and not _triton_rows.usable(x, 2, None, None)
    np.testing.assert_allclose(y.cpu().numpy(), _pav("mask", x.cpu().numpy(), 2, 4.0 / 3.0)[0], atol=1e-12)


def test_when_the_kernels_are_used(monkeypatch):
    monkeypatch.setattr(_triton_rows, "_failures", [])
    rows = torch.zeros((4, 64))
    monkeypatch.setenv(_triton_rows.ENVIRONMENT_VARIABLE, "auto")
    assert not _triton_rows.usable(rows, 3, None, None)  # CPU tensors: the core's CPU paths
    monkeypatch.setenv(_triton_rows.ENVIRONMENT_VARIABLE, "always")
    assert _triton_rows.usable(rows, 3, None, None)
    assert not _triton_rows.usable(rows, 64, None, None)  # k = n: nothing to solve
    assert not _triton_rows.usable(rows, 3, 50, None)  # max_iter and tol are the Array-API method's
    assert not _triton_rows.usable(rows, 3, None, 1e-6)
    assert not _triton_rows.usable(torch.zeros((2, _triton_rows.kernels().MAX_N + 1)), 3, None, None)
    assert not _triton_rows.usable(torch.zeros((0, 64)), 3, None, None)
    monkeypatch.setenv(_triton_rows.ENVIRONMENT_VARIABLE, "never")
    assert not _triton_rows.usable(rows, 3, None, None)
    monkeypatch.setenv(_triton_rows.ENVIRONMENT_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match="SPARSE_TOPK_TORCH_TRITON must be one of"):
        _triton_rows.usable(rows, 3, None, None)


@pytest.mark.parametrize("n", [2, 16, 17, 64, 1000, 4096])
def test_block_shapes_cover_the_row(n):
    module = _triton_rows.kernels()
    block, rows, warps = module.block_shape(n)
    assert block >= n and block & (block - 1) == 0 and rows >= 1 and 4 <= warps <= 16
    # Two float64 entries per thread and array up to 1024 entries (no register spills on sm_90 up to
    # n = 256, benchmarks/triton_registers.py); at most 16 warps beyond.
    per_thread = block * rows // (32 * warps)
    assert per_thread == module.ENTRIES_PER_THREAD if block <= 1024 else warps == 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("operator", ["mask", "mag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_rows_take_the_compiled_kernel_by_default(operator, dtype, monkeypatch, rng):
    monkeypatch.delenv(_triton_rows.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(_triton_rows, "_failures", [])
    launches = []
    launch = _triton_rows._launch
    monkeypatch.setattr(_triton_rows, "_launch", lambda *a, **kw: launches.append(a[0]) or launch(*a, **kw))
    x = rows_of_kind(rng, 2048, 64, "normal", np.float64)
    xt = torch.tensor(x, device="cuda", dtype=dtype, requires_grad=True)
    y = getattr(tt, f"soft_topk_{operator}")(xt, 6, method="threshold")
    u = rng.normal(size=x.shape)
    (grad,) = torch.autograd.grad(y, xt, torch.tensor(u, device="cuda", dtype=dtype))
    assert launches == [operator] and y.device.type == "cuda" and grad.device.type == "cuda"
    y0, vjp = getattr(tn, f"soft_topk_{operator}_vjp")(x, 6, method="pav")
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(y.detach().cpu().numpy(), y0, rtol=0, atol=atol * np.abs(y0).max())
    if dtype == torch.float64:
        np.testing.assert_allclose(grad.cpu().numpy(), vjp(u), rtol=0, atol=1e-9)


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    n=st.integers(2, 24),
    p=st.sampled_from(P_VALUES),
    lam=st.sampled_from([1e-3, 0.1, 1.0, 30.0]),
    operator=st.sampled_from(["mask", "mag"]),
)
def test_kernel_agrees_with_pav_on_any_rows(data, n, p, lam, operator, kernels_on):
    """Property: for any finite rows (values drawn from a few levels, so ties and zeros are common, and
    from anywhere in float64's range), k and strength, the kernel agrees with PAV, and keeps every row
    whose values lie between 1e-6 and 1e6 (or are 0); others it may hand back to the Array-API method."""
    k = data.draw(st.integers(1, n - 1))
    levels = st.sampled_from([0.0, 0.5, -0.5, 1.0, -2.0, 3.0, 1e-3, 1e3])
    values = st.one_of(levels, st.floats(-10, 10), st.floats(-1e300, 1e300))
    x = np.array(data.draw(st.lists(st.lists(values, min_size=n, max_size=n), min_size=1, max_size=4)))
    y0, res0 = _pav(operator, x, k, p, lam)
    handed_back, y, res = _launch(operator, x, k, p, lam)
    a = np.abs(x)
    moderate = np.all((a == 0) | ((a >= 1e-6) & (a <= 1e6)), axis=1)
    assert not (handed_back & moderate).any()
    kept = ~handed_back
    for row in np.flatnonzero(kept):
        np.testing.assert_allclose(y[row], y0[row], rtol=0, atol=1e-9 * np.abs(y0[row]).max())
    # The same free sets where the values are moderate (with values of 1e-35 and 1e-54, an output
    # within 1e-78 of saturation can fall on either side of it in any solver).
    rows = kept & moderate
    np.testing.assert_array_equal(res[0][rows] > 0, np.asarray(res0.gprime)[rows] > 0)
    with torch.no_grad():  # the public route, hand-back included
        out = getattr(tt, f"soft_topk_{operator}")(torch.tensor(x, device=DEVICE), k, regularization_strength=lam,
                                                   p=p, method="threshold")
    for row, out_row in enumerate(out.cpu().numpy()):
        np.testing.assert_allclose(out_row, y0[row], rtol=0, atol=1e-9 * np.abs(y0[row]).max())


@requires_compile()
def test_transforms_and_compile_take_the_kernel(kernels_on, monkeypatch, rng):
    """`torch.func` (vmap of a VJP, jvp) and `torch.compile(fullgraph=True)` over the kernels' route."""
    launches = []
    launch = _triton_rows._launch
    monkeypatch.setattr(_triton_rows, "_launch", lambda *a, **kw: launches.append(a[0]) or launch(*a, **kw))
    x = rng.normal(size=(3, 10))
    u = rng.normal(size=x.shape)
    xt, ut = torch.tensor(x, device=DEVICE), torch.tensor(u, device=DEVICE)

    def mag(rows):
        return tt.soft_topk_mag(rows, 3, method="threshold")

    _, vjp = tn.soft_topk_mag_vjp(x, 3, method="pav")
    grads = torch.func.vmap(lambda row, cot: torch.func.vjp(mag, row)[1](cot)[0])(xt, ut)
    np.testing.assert_allclose(grads.cpu().numpy(), vjp(u), rtol=0, atol=1e-10)
    _, y_dot = torch.func.jvp(mag, (xt,), (ut,))
    np.testing.assert_allclose(y_dot.cpu().numpy(), tn.soft_topk_mag_jvp(x, u, 3, method="pav")[1], atol=1e-10)
    compiled = torch.compile(mag, fullgraph=True, backend="eager")
    np.testing.assert_allclose(compiled(xt).cpu().numpy(), tn.soft_topk_mag(x, 3, method="pav"), atol=1e-12)
    assert launches and set(launches) == {"mag"}
