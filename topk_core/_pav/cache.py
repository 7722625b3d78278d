"""Numba's on-disk cache of the kernels, invalidated by a change to any of their source files.

Numba keys a cached function by its own source file only (a hash of its
contents), while the compiled code it stores holds the code of every jitted
function it calls or inlines, from other files too.  A change to such a file
alone (a helper in `_scalar.py`, the kernels that `lanes.py` lends to
`select.py`, the set code in `residuals.py`) left the callers' cached code as
it was: a git checkout, an editable install or a package upgrade (the cache
files stay beside the sources, or in the user-wide cache) then ran the old
code.  The locators installed here stamp every kernel with one hash of all
the files the kernels are compiled from, so that a change to any of them
compiles every kernel again.

Numba's locator classes are internal (`numba.core.caching`): where they are
not as expected, the default locators stay in place.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

_PAV = Path(__file__).resolve().parent
# Every file the kernels are compiled from: the kernels and their helpers, and the constant they read
# from outside (`KEPT_CODE`).
SOURCES = (*sorted(_PAV.glob("*.py")), _PAV.parent / "_agnostic" / "residuals.py")


def sources_digest(sources: tuple[Path, ...] | list[Path] = SOURCES) -> bytes:
    """The hash of the names and contents of the files `sources` (by default `SOURCES`)."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.digest()


def _is_kernel_file(py_file: str) -> bool:
    """Whether the function of a locator's question lives in this folder (the locators serve no other)."""
    return Path(py_file).resolve().parent == _PAV


def _stamped(base: type) -> type:
    """`base` (one of Numba's source-file locators) for the kernels' files only, stamped with `sources_digest`."""

    class Stamped(base):
        kernel_sources = _PAV

        @classmethod
        def from_function(cls, py_func, py_file):
            return super().from_function(py_func, py_file) if _is_kernel_file(py_file) else None

        def get_source_stamp(self):
            return _DIGEST

    Stamped.__name__ = Stamped.__qualname__ = f"KernelSources{base.__name__}"
    return Stamped


def _temp_dir_stamped(base: type) -> type:
    """The last resort, after `base` (Numba's locator of `NUMBA_CACHE_DIR`) and the others: a folder of this
    user's in the temporary directory.  Where neither the package's `__pycache__` nor the user-wide
    cache can be written (a read-only image whose home is read-only too), Numba finds no locator and
    importing the package failed ("cannot cache function ...: no locator available")."""

    class TempDir(_stamped(base)):
        def __init__(self, py_func, py_file):
            super().__init__(py_func, py_file)
            self._cache_path = os.path.join(_user_temp_dir(), self.get_suitable_cache_subpath(py_file))

        @classmethod
        def from_function(cls, py_func, py_file):
            if not _is_kernel_file(py_file):
                return None
            try:
                locator = cls(py_func, py_file)
                locator.ensure_cache_path()
            except OSError:
                return None
            return locator

    TempDir.__name__ = TempDir.__qualname__ = "KernelSourcesTempDirLocator"
    return TempDir


def _user_temp_dir() -> str:
    """`sparse-topk-numba-<user>` in the temporary directory: the user's own (mode 0700; Numba's index files
    are pickles, which a folder others can write would let them replace)."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    path = os.path.join(tempfile.gettempdir(), f"sparse-topk-numba-{user}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    if hasattr(os, "getuid") and os.stat(path).st_uid != os.getuid():
        raise OSError(f"{path} belongs to another user")
    return path


def install() -> bool:
    """Put the stamped locators first in Numba's list (once); False where Numba's internals differ."""
    try:
        from numba.core import caching

        # Names without a leading underscore in recent Numba (0.68 here), with one in older releases.
        bases = tuple(getattr(caching, name, None) or getattr(caching, "_" + name)
                      for name in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator"))
        locators = (getattr(caching, "CacheImpl", None) or caching._CacheImpl)._locator_classes
    except (ImportError, AttributeError):
        return False
    if not any(getattr(cls, "kernel_sources", None) == _PAV for cls in locators):  # one set per copy of the core
        locators[:0] = [*(_stamped(base) for base in bases), _temp_dir_stamped(bases[0])]
    return True


_DIGEST = sources_digest()
INSTALLED = install()
