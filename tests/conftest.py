"""Shared fixtures: backends, dtypes, exponents and an isolated random generator per test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from ._method_backends import BACKENDS, backend_context


def _interpret_triton_kernels_without_a_gpu() -> None:
    """Without CUDA, the threshold method's Triton kernels run in Triton's interpreter on CPU tensors.

    Triton reads the setting when a kernel is decorated, at the first import of
    `topk_core._triton_rows`: it is set here, before anything is collected.
    """
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_kernels_without_a_gpu()

# XLA compiles the tests' many small programs (every shape, axis, p and transformation) without its
# backend's optimizations (`jax_disable_most_optimizations`: LLVM at level 0; the HLO passes still
# run): a quarter less time for the JAX tests (tests/test_jax_methods.py with -n 2: 214 s -> 160 s).
# Set before JAX is imported; the tests' subprocesses inherit it.  The benchmarks and the examples,
# run on their own, compile with every optimization.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# XLA's CPU backend also compiles them with its older (non-MLIR) fusion emitters and on one
# code-generation thread: each threshold program compiles in about 0.45 s instead of 1.15 s (p in
# {4/3, 2, 3}, both operators, (9, 7) float64), test_jax_methods' vmap and float64 tests take 53 s
# instead of 117 s (one worker), and the whole suite on a cold Numba cache, as on CI, 682 s instead of
# 902 s (-n 2, an AVX2 machine of 2 cores).  An XLA that does not know a flag aborts the process, so
# the flags are tried once in a subprocess (about 2 s) by the first process that loads this file; the
# pytest-xdist workers and the tests' subprocesses inherit the result through the environment.
FAST_XLA_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
FAST_XLA_COMPILE_TRIED = "SPARSE_TOPK_TESTS_FAST_XLA_COMPILE_TRIED"


def _compile_jax_programs_fast() -> None:
    if os.environ.get(FAST_XLA_COMPILE_TRIED):
        return
    os.environ[FAST_XLA_COMPILE_TRIED] = "1"
    if importlib.util.find_spec("jax") is None:
        return
    flags = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA_COMPILE_FLAGS}".strip()
    probe = "import jax; jax.jit(lambda a: a + 1)(1.0).block_until_ready()"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    try:
        ok = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if ok:
        os.environ["XLA_FLAGS"] = flags


_compile_jax_programs_fast()

# Modules that run first: the longest module fixture (test_vector_width's kernels, 100-140 s)
# and the longest single tests.  pytest-xdist's `worksteal` hands each worker a contiguous half of the
# items and an idle worker steals from the end of the other's queue: at the front, a module stays on one
# worker, its module fixtures are set up once, and no long test is left for the end while the other
# worker idles.  Last in the alphabet, test_vector_width was split between the workers and its fixture
# set up three times in one run (114 + 98 + 93 s).
FIRST_MODULES = ("test_vector_width.py", "test_examples.py", "test_applications_docs.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(FIRST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST_MODULES)))  # stable: the rest keep their order


P_VALUES = [1.25, 4.0 / 3.0, 1.5, 2.0, 3.0]
P_IDS = ["p=5/4", "p=4/3", "p=3/2", "p=2", "p=3"]


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's name, so every test is reproducible on its own."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(params=P_VALUES, ids=P_IDS)
def p(request) -> float:
    return request.param


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def float_dtype(request):
    return request.param


@pytest.fixture(params=["mask", "mag"])
def operator(request) -> str:
    return request.param


@pytest.fixture
def x64():
    """Run a JAX test with 64-bit types, restoring the previous setting afterwards."""
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    """One Array-API backend of `_method_backends` (numpy, torch, jax with x64, array_api_strict)."""
    with backend_context(request.param) as b:
        yield b
