"""The floating-point mode the host kernels compute in: subnormal numbers kept, whatever the caller's mode.

XLA runs the host callbacks of JAX on the CPU (`jax.pure_callback`,
`buffer_callback`) with the x86 flags flush-to-zero and
denormals-are-zero set, so a kernel called there reads subnormal inputs
as 0 and writes subnormal results as 0.  Worse, Numba's worker threads
copy the mode of the thread that starts them (on the first parallel
kernel of the process) and keep it for the life of the process: a JAX
call that started them left every later parallel kernel, called from
NumPy or PyTorch too, flushing subnormals on all its threads but the
caller's (the output 9.9e-39 of a float32 key 1e-38 came back 0 from
two of three parts of a long row, `tests/test_fp_mode.py`).

`subnormals_kept` runs a block in the mode of the thread that imported
this module (the default IEEE mode, in every ordinary program) and
restores the caller's mode after it, through the C library's
`fegetenv`/`fesetenv`, which save and restore the whole environment,
the SSE control word (x86) or FPCR (Arm) included.  (A C library without
them, none known, leaves the caller's mode: the block then runs as
before this module.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from types import TracebackType

__all__ = ["subnormals_kept"]

# Larger than `fenv_t` on every platform (32 bytes with glibc on x86-64, 8 on Arm64).
_ENV_BYTES = 256


def _fenv_functions() -> tuple[Callable[..., int], Callable[..., int]] | None:
    """`fegetenv` and `fesetenv` of the C library, None where none is found (the mode is then the caller's)."""
    # POSIX: the process's own symbols hold the C math library (CPython links it), else libm by name (looked
    # up only then: `find_library` runs a subprocess).  Windows: the UCRT.
    names = (lambda: "ucrtbase",) if sys.platform == "win32" else (lambda: None, lambda: ctypes.util.find_library("m"))
    for name in names:
        try:
            library = ctypes.CDLL(name())
            return library.fegetenv, library.fesetenv
        except (OSError, AttributeError, TypeError):
            continue
    return None  # pragma: no cover - a C library without fenv.h's functions


# (No argtypes: the buffers go in as pointers, and the calls stay at a microsecond for the three.)
_FENV = _fenv_functions()
# The mode of the importing thread, the one the kernels are meant to compute in.
_REFERENCE = ctypes.create_string_buffer(_ENV_BYTES)
if _FENV is not None and _FENV[0](_REFERENCE) != 0:  # pragma: no cover - fegetenv does not fail where it exists
    _FENV = None


class subnormals_kept:  # (lower case: used as a function, ``with subnormals_kept():``)
    """Run the block in the importing thread's floating-point mode, then restore the caller's.

    A class rather than a generator: a host callback pays it on every call (about 1 us, against
    1.8 us for `contextlib.contextmanager`; `benchmarks/bench_fp_mode.py` times it and the jitted calls
    with and without it).

    Examples
    --------
    >>> import numpy as np
    >>> with subnormals_kept():
    ...     float(np.float32(1e-38) * np.float32(1.0))  # 0.0 where the caller flushes subnormals
    9.999999350456404e-39
    """

    __slots__ = ("_caller",)

    def __enter__(self) -> None:
        if _FENV is not None:
            get_env, set_env = _FENV
            self._caller = ctypes.create_string_buffer(_ENV_BYTES)
            get_env(self._caller)
            set_env(_REFERENCE)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if _FENV is not None:
            _FENV[1](self._caller)
