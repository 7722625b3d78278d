"""Numba's on-disk cache of the kernels follows every file they are compiled from (`topk_core._pav.cache`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from numba.core.dispatcher import Dispatcher

import topk_core
from topk_core._pav import _scalar, cache, kernels, lanes, products, select, sortfree, transpose, vector_width

from ._subprocess import run_python

# A block of the magnitude's closed form for q = 4 (count, mean, m2, m3, unit weights, l, q, is_mag, shift):
# `kernels._closed_block_value`, a small kernel, calls `_scalar.depressed_cubic_root`, compiled from another
# file and linked into it.
BLOCK = (2.0, 0.5, 0.1, 0.0, 1.0, 0.5, 4.0, False, 0.0)

CORE = Path(topk_core.__file__).parent


def _dispatchers():
    for module in (_scalar, kernels, lanes, products, select, sortfree, transpose, vector_width):
        for name, value in vars(module).items():
            for candidate in (value, getattr(value, "serial", None), getattr(value, "parallel", None)):
                if isinstance(candidate, Dispatcher) and type(candidate._cache).__name__ != "NullCache":
                    yield f"{module.__name__}.{name}", candidate


def test_every_cached_kernel_is_stamped_with_all_kernel_sources():
    assert cache.INSTALLED
    found = dict(_dispatchers())
    assert len(found) > 40
    for name, dispatcher in found.items():
        locator = dispatcher._cache._impl._locator
        assert getattr(locator, "kernel_sources", None) == CORE / "_pav", name
        assert locator.get_source_stamp() == cache.sources_digest(), name


def test_the_stamp_follows_every_source_file(tmp_path):
    assert CORE / "_agnostic" / "residuals.py" in cache.SOURCES
    assert {p.name for p in cache.SOURCES} >= {"kernels.py", "lanes.py", "select.py", "_scalar.py", "residuals.py"}
    before = cache.sources_digest()
    for path in cache.SOURCES:
        copies = [tmp_path / p.name if p == path else p for p in cache.SOURCES]
        shutil.copy(path, tmp_path / path.name)
        with open(tmp_path / path.name, "a") as f:
            f.write("\n# edited\n")
        assert cache.sources_digest(copies) != before, path.name
    assert cache.sources_digest() == before


# Both scripts print `_closed_block_value` of the block in their last argument (JSON).
_CALL = """
import json, sys
sys.path.insert(0, sys.argv[1])
from core_copy._pav import kernels
print(kernels._closed_block_value(*json.loads(sys.argv[2])))
"""


def test_a_callee_edited_in_another_file_compiles_its_callers_again(tmp_path):
    """`_closed_block_value` (kernels.py) calls `_scalar.depressed_cubic_root` (another file).  With Numba's own
    stamp (the caller's file alone), the second process loaded the cached caller, the old callee linked in,
    and printed the first process's number (seen with `pav_rows` and `_scalar.mag_fixed_point`)."""
    shutil.copytree(CORE, tmp_path / "core_copy", ignore=shutil.ignore_patterns("__pycache__"))

    def run() -> str:
        return run_python(_CALL, str(tmp_path), json.dumps(BLOCK),
                          env={"NUMBA_CACHE_DIR": str(tmp_path / "numba_cache")}).strip()

    first = run()
    assert float(first) == kernels._closed_block_value(*BLOCK)
    scalar = tmp_path / "core_copy" / "_pav" / "_scalar.py"
    signature = "def depressed_cubic_root(pc: float, qc: float) -> float:\n"
    text = scalar.read_text()
    assert signature in text
    scalar.write_text(text.replace(signature, signature + "    return -1.0\n"))
    # mean - e l with the root e = -1: 0.5 + 0.5.
    assert run() == "1.0" != first


_READ_ONLY = """
import json, os, sys
import numba.core.caching as caching
writable = os.environ["TMPDIR"]
ensure = caching._CacheLocator.ensure_cache_path


def read_only_outside_tmpdir(locator):  # every cache folder but the temporary directory's is read-only
    if not os.path.abspath(locator.get_cache_path()).startswith(writable):
        raise OSError(30, "Read-only file system")
    return ensure(locator)


caching._CacheLocator.ensure_cache_path = read_only_outside_tmpdir
import topk_numpy
from topk_core._pav import kernels
print(kernels._closed_block_value(*json.loads(sys.argv[1])))
"""


def test_kernels_cache_in_the_temporary_directory_where_nothing_else_is_writable(tmp_path):
    """A read-only package folder and home (a read-only container image): Numba found no cache folder, and
    importing the package failed ("cannot cache function 'g_scalar': no locator available")."""
    output = run_python(_READ_ONLY, json.dumps(BLOCK), env={"NUMBA_CACHE_DIR": None, "TMPDIR": str(tmp_path)})
    assert float(output) == kernels._closed_block_value(*BLOCK)
    (folder,) = tmp_path.glob("sparse-topk-numba-*")
    assert any(folder.rglob("kernels._closed_block_value-*.nbi"))
    if hasattr(os, "getuid"):
        assert folder.stat().st_mode & 0o777 == 0o700
