"""The host kernels compute with subnormal numbers kept, also when JAX's runtime calls them flushing them.

XLA runs host callbacks on the CPU with flush-to-zero and denormals-are-zero set.  The JAX adapter runs
the core there through `topk_core._fpmode.subnormals_kept`: checked here that the block keeps subnormals
and the caller's mode comes back after it (and, without the C library's fenv functions, runs in the
caller's mode); that `"pav"` in `topk_jax` and `topk_torch` give `topk_numpy`'s numbers on rows of
subnormal numbers (JAX: forward and VJP, both host-call paths); and, in a fresh process, that a JAX call
starting Numba's worker threads no longer leaves them flushing for the NumPy calls after it (the failure
that made `test_magnitude_threshold_deep_below_its_first_iterates_keeps_its_digits[*-float32-row1-*]` of
tests/test_sortfree_kernel.py fail in whole-suite runs only, on the xdist workers whose first parallel
kernel a JAX test had called).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from topk_core import _fpmode
from topk_core._fpmode import subnormals_kept

from ._subprocess import run_python

jax = pytest.importorskip("jax")
jnp = jax.numpy
tj = pytest.importorskip("topk_jax")
import topk_numpy as tn  # noqa: E402
from topk_jax import _host_call  # noqa: E402

TINY32 = np.float32(1e-38)  # subnormal in float32 (the smallest normal number is 1.18e-38)


@pytest.fixture(autouse=True)
def _on_the_cpu():
    # XLA's CPU runtime is the one that flushes: on a GPU machine the arrays would live on the GPU.
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _product_kept() -> bool:
    # An array operation, computed by NumPy's C loop in the calling thread's mode; its bits compared
    # (a comparison in a mode that reads subnormals as 0 finds 0 == 1e-38).
    product = np.multiply(np.array([TINY32]), np.float32(1.0))
    return bool(product.view(np.uint32)[0] == np.array([TINY32]).view(np.uint32)[0])


def _in_a_jitted_callback(callback) -> None:
    """Run ``callback(x)`` (returning x) as XLA's host callback of a jitted function, to its end."""
    f = jax.jit(lambda x: jax.pure_callback(callback, jax.ShapeDtypeStruct(x.shape, x.dtype), x))
    f(jnp.ones(3)).block_until_ready()


def test_subnormals_kept_inside_a_callback_and_the_callers_mode_restored():
    seen = []

    def callback(x):
        seen.append(_product_kept())
        with subnormals_kept():
            seen.append(_product_kept())
        seen.append(_product_kept())
        return np.asarray(x)

    _in_a_jitted_callback(callback)
    # XLA's mode flushes (else this test checks nothing), the block keeps, and XLA's mode is back after it.
    assert seen == [False, True, False]
    assert _product_kept()  # and this thread's own mode is untouched


def test_without_the_c_librarys_fenv_functions_the_block_runs_in_the_callers_mode(monkeypatch):
    # (No known platform lacks them: the fallback must still run the block, in the caller's mode.)
    monkeypatch.setattr(_fpmode, "_FENV", None)
    seen = []

    def callback(x):
        with subnormals_kept():
            seen.append(_product_kept())
        return np.asarray(x)

    _in_a_jitted_callback(callback)
    assert seen == [False]


_SUBNORMAL_ROWS = np.array([[3e-310, -1e-310, 2e-311, 5e-312, -4e-309, 0.0], [1.0, -2e-310, 0.5, 3e-320, 1e-308, -0.25]])
# Normal strengths (JAX refuses subnormal ones: XLA's own computations flush them).
_STRENGTHS = {"mask": 1e-307, "mag": 1e-300}


@pytest.mark.parametrize("path", ["buffer_callback", "pure_callback"])
@pytest.mark.parametrize("operator", ["mask", "mag"])
def test_pav_in_jax_gives_numpys_numbers_on_subnormal_rows(operator, path, monkeypatch):
    if path == "pure_callback":
        monkeypatch.setattr(_host_call, "_buffer_callback", None)
    elif _host_call._buffer_callback is None:
        pytest.skip("this JAX has no buffer_callback")
    name = f"soft_topk_{operator}"
    kw = {"regularization_strength": _STRENGTHS[operator], "method": "pav"}
    u = np.random.default_rng(3).normal(size=_SUBNORMAL_ROWS.shape)
    want, pullback_numpy = getattr(tn, f"{name}_vjp")(_SUBNORMAL_ROWS, 2, **kw)
    want_vjp = pullback_numpy(u)
    if operator == "mag":  # subnormal outputs, which flushing loses
        assert np.any((want != 0) & (np.abs(want) < 2.2e-308))
    else:  # outputs strictly between 0 and 1, which flushing the keys to 0 (ties) changes
        assert np.any((want > 0) & (want < 1) & (want != 0.5))
    with jax.enable_x64(True):
        f = lambda x: getattr(tj, name)(x, 2, **kw)  # noqa: E731
        x = jnp.asarray(_SUBNORMAL_ROWS)
        for got in (f(x), jax.jit(f)(x)):
            np.testing.assert_array_equal(np.asarray(got), want)
        _, pullback = jax.vjp(jax.jit(f), x)
        # (The product from the residuals may be XLA's, rounded in another order: to 1e-12.)
        np.testing.assert_allclose(np.asarray(pullback(jnp.asarray(u))[0]), want_vjp, rtol=1e-12, atol=0)


@pytest.mark.parametrize("operator", ["mask", "mag"])
def test_pytorch_gives_numpys_numbers_on_subnormal_rows(operator):
    # The third framework of docs/policy.md's "Subnormal numbers": the same kernels, the same bits.
    torch = pytest.importorskip("torch")
    tt = pytest.importorskip("topk_torch")
    kw = {"regularization_strength": _STRENGTHS[operator]}
    want = getattr(tn, f"soft_topk_{operator}")(_SUBNORMAL_ROWS, 2, **kw)
    got = getattr(tt, f"soft_topk_{operator}")(torch.from_numpy(_SUBNORMAL_ROWS), 2, **kw)
    np.testing.assert_array_equal(got.numpy(), want)


# A fresh process: its first parallel Numba kernel runs inside a JAX host call (rows long enough for the
# selection kernel's threads), then the long-row driver, three parts over two threads, on a float32 row
# whose key 1e-38 has the subnormal output 9.9e-39 (tests/test_sortfree_kernel.py's DEEP_BELOW_ROWS[1]).
_AFTER_A_JAX_CALL = """
import json
import numpy as np
import jax.numpy as jnp
import topk_jax
from topk_core._pav import select
from topk_core._pav.kernels import fused_outputs, read_only

rows = np.random.default_rng(0).normal(size=(4, 20000)).astype(np.float32)
np.asarray(topk_jax.soft_topk_mag(jnp.asarray(rows), 2000))
row = np.array((100.0, 100.0, 1e-38, 100.0, 1.0, 5.62341325e-13, 100.0) + (1e-14,) * 20, np.float32)
wide = np.tile(row, 300)[None]
arrays = fused_outputs(wide, True, False)
select._select_long_rows(read_only(np.abs(wide)), read_only(wide), 1810, 2.0, 4.0, True, *arrays, 3, 8192, True)
print(json.dumps([float(v) for v in arrays[0][0, 2::27]]))
"""


def test_a_jax_call_leaves_numbas_threads_keeping_subnormals():
    env = {"NUMBA_NUM_THREADS": "2", "JAX_PLATFORMS": "cpu"}
    outputs = json.loads(run_python(_AFTER_A_JAX_CALL, env=env).splitlines()[-1])
    # The 300 copies of the key 1e-38, one per copy of the row, in every part alike.
    assert len(outputs) == 300 and len(set(outputs)) == 1
    assert 9.9e-39 < outputs[0] < 9.95e-39
