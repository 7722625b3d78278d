"""topk_jax under `jax.jit` with a sharded batch: equal to the unsharded call, and still sharded.

JAX fixes the number of host devices when it starts, so the checks run in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from __future__ import annotations

import os
import textwrap

import pytest

from ._subprocess import run_python

pytest.importorskip("jax")

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import topk_jax as tk

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 33)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(33,)), jnp.float32)

    def soft_fwd(x):
        return tk.soft_topk_mask(x, 5)

    def soft_grad(x):
        return jax.grad(lambda x: jnp.sum(tk.soft_topk_mag(x, 5) ** 2 * w[: x.shape[-1]]))(x)

    def per_row_grad(x):
        return jax.vmap(jax.grad(lambda r: jnp.sum(tk.soft_topk_mask(r, 5) * w)))(x)

    def hard(x):
        return tk.hard_topk_mask(x, 5) + jax.grad(lambda x: jnp.sum(tk.hard_topk_mag(x, 5) * w))(x)

    CASES = {"soft_fwd": soft_fwd, "soft_grad": soft_grad, "per_row_grad": per_row_grad, "hard": hard}

    def callback_operand_rows(f, arg):
        hlo = jax.jit(f).lower(arg).compile().as_text()
        lines = [line for line in hlo.splitlines() if "custom-call(" in line and "callback" in line]
        return {int(line.split("[")[1].split(",")[0]) for line in lines}

    for kind in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((4,), ("b",), axis_types=(kind,))
        xs = jax.device_put(x, NamedSharding(mesh, P("b", None)))
        for name, f in CASES.items():
            want = np.asarray(jax.jit(f)(x))
            got = jax.jit(f)(xs)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6, err_msg=f"{kind} {name}")
            assert got.sharding.spec == P("b", None), (kind, name, got.sharding)
        # One host call per device on its 4 local rows, never on the gathered 16.
        assert callback_operand_rows(soft_fwd, xs) == {4}, callback_operand_rows(soft_fwd, xs)
        assert callback_operand_rows(soft_grad, xs) == {4}, callback_operand_rows(soft_grad, xs)

        # The operator's own axis sharded: it is gathered, the result is still right.
        xa = jax.device_put(x[:, :32], NamedSharding(mesh, P(None, "b")))
        for f in (soft_fwd, soft_grad):
            got = jax.jit(f)(xa)
            np.testing.assert_allclose(np.asarray(got), np.asarray(f(x[:, :32])), rtol=1e-6, atol=1e-6)

        # A batch that the devices do not divide: one host call on the whole array.
        x15 = x[:15]
        xr = jax.device_put(x15, NamedSharding(mesh, P()))
        np.testing.assert_array_equal(np.asarray(jax.jit(soft_fwd)(xr)), np.asarray(soft_fwd(x15)))
        print("ok", kind.name)

    # Two mesh axes, a 3-d input sharded on its first two axes.
    mesh = jax.make_mesh((2, 2), ("a", "c"))
    x3 = jnp.asarray(rng.normal(size=(4, 6, 33)), jnp.float32)
    x3s = jax.device_put(x3, NamedSharding(mesh, P("a", "c")))
    for name in ("soft_fwd", "soft_grad", "hard"):
        got = jax.jit(CASES[name])(x3s)
        np.testing.assert_allclose(np.asarray(got), np.asarray(CASES[name](x3)), rtol=1e-6, atol=1e-6)
        assert got.sharding.spec == P("a", "c", None), (name, got.sharding)
    print("ok 2d")

    # Inside a user's shard_map the data is already local.
    mesh = jax.make_mesh((4,), ("b",))
    xs = jax.device_put(x, NamedSharding(mesh, P("b", None)))
    local = jax.jit(jax.shard_map(soft_grad, mesh=mesh, in_specs=P("b"), out_specs=P("b"), check_vma=False))
    np.testing.assert_allclose(np.asarray(local(xs)), np.asarray(soft_grad(x)), rtol=1e-6, atol=1e-6)
    print("ok shard_map")
    """
)


def test_sharded_batch_matches_unsharded():
    # The flag added to this process's XLA flags (tests/conftest.py's, which compile the programs faster).
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    output = run_python(SCRIPT, env={"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert output.split() == ["ok", "Explicit", "ok", "Auto", "ok", "2d", "ok", "shard_map"], output
