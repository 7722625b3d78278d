"""Numba's on-disk cache of the kernels follows every file they are compiled from (`topk_core._pav.cache`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from numba.core.dispatcher import Dispatcher

import topk_core
from topk_core._pav import _scalar, cache, kernels, lanes, products, select, sortfree, transpose, vector_width

from ._subprocess import run_python

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


_CALL = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from core_copy._pav import kernels
keys = np.array([[3.0, 2.0, 1.0, 0.5]])
one = np.ones(1, np.int64)
v = kernels.pav_rows.serial(keys, np.arange(4)[None], 0 * one, 4 * one, one, 0.5, 3.0, True)[0]
print(v.tolist())
"""


def test_a_callee_edited_in_another_file_compiles_its_callers_again(tmp_path):
    """`pav_rows` (kernels.py) calls `_scalar.mag_fixed_point` (another file).  With Numba's own stamp (the
    caller's file alone), the second process loaded the cached `pav_rows`, the old callee linked in, and
    printed the first process's numbers."""
    shutil.copytree(CORE, tmp_path / "core_copy", ignore=shutil.ignore_patterns("__pycache__"))

    def run() -> str:
        return run_python(_CALL, str(tmp_path), env={"NUMBA_CACHE_DIR": str(tmp_path / "numba_cache")}).strip()

    first = run()
    scalar = tmp_path / "core_copy" / "_pav" / "_scalar.py"
    signature = "def mag_fixed_point(s: float, lam: float, q: float) -> float:\n"
    text = scalar.read_text()
    assert signature in text
    scalar.write_text(text.replace(signature, signature + "    return -1.0\n"))
    edited = run()
    assert edited != first
    assert "-1.0" in edited


_READ_ONLY = """
import os, sys
import numba.core.caching as caching
writable = os.environ["TMPDIR"]
ensure = caching._CacheLocator.ensure_cache_path


def read_only_outside_tmpdir(locator):  # every cache folder but the temporary directory's is read-only
    if not os.path.abspath(locator.get_cache_path()).startswith(writable):
        raise OSError(30, "Read-only file system")
    return ensure(locator)


caching._CacheLocator.ensure_cache_path = read_only_outside_tmpdir
import numpy as np
import topk_numpy
from topk_core._pav import kernels
keys = np.array([[3.0, 2.0, 1.0, 0.5]])
one = np.ones(1, np.int64)
print(kernels.pav_rows.serial(keys, np.arange(4)[None], 0 * one, 4 * one, one, 0.5, 3.0, True)[0].tolist())
"""


def test_kernels_cache_in_the_temporary_directory_where_nothing_else_is_writable(tmp_path):
    """A read-only package folder and home (a read-only container image): Numba found no cache folder, and
    importing the package failed ("cannot cache function 'g_scalar': no locator available")."""
    output = run_python(_READ_ONLY, env={"NUMBA_CACHE_DIR": None, "TMPDIR": str(tmp_path)})
    keys, one = np.array([[3.0, 2.0, 1.0, 0.5]]), np.ones(1, np.int64)
    expected = kernels.pav_rows.serial(keys, np.arange(4)[None], 0 * one, 4 * one, one, 0.5, 3.0, True)[0]
    assert output.strip() == str(expected.tolist())
    (folder,) = tmp_path.glob("sparse-topk-numba-*")
    assert any(folder.rglob("kernels.pav_rows-*.nbi"))
    if hasattr(os, "getuid"):
        assert folder.stat().st_mode & 0o777 == 0o700
