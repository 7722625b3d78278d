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
the SSE control word (x86) or FPCR (Arm) included.
"""

from __future__ import annotations

import ctypes
import sys
from types import TracebackType

__all__ = ["subnormals_kept"]

# Larger than `fenv_t` on every platform (32 bytes with glibc on x86-64, 8 on Arm64).
_ENV_BYTES = 256


def _c_library() -> ctypes.CDLL:
    # The process's own symbols hold the C math library on POSIX (CPython links it); Windows: the UCRT.
    return ctypes.CDLL("ucrtbase") if sys.platform == "win32" else ctypes.CDLL(None)


# (No argtypes: the buffers go in as pointers, and the calls stay at a microsecond for the three.)
_LIBRARY = _c_library()
_get_env, _set_env = _LIBRARY.fegetenv, _LIBRARY.fesetenv
# The mode of the importing thread, the one the kernels are meant to compute in.
_REFERENCE = ctypes.create_string_buffer(_ENV_BYTES)
if _get_env(_REFERENCE) != 0:  # pragma: no cover - fegetenv fails on no supported platform
    raise ImportError("fegetenv failed: cannot read the floating-point environment")


class subnormals_kept:  # (lower case: used as a function, ``with subnormals_kept():``)
    """Run the block in the importing thread's floating-point mode, then restore the caller's.

    A class rather than a generator: a host callback pays it on every call (about 1 us, against
    1.8 us for `contextlib.contextmanager`).

    Examples
    --------
    >>> import numpy as np
    >>> with subnormals_kept():
    ...     float(np.float32(1e-38) * np.float32(1.0))  # 0.0 where the caller flushes subnormals
    9.999999350456404e-39
    """

    __slots__ = ("_caller",)

    def __enter__(self) -> None:
        self._caller = ctypes.create_string_buffer(_ENV_BYTES)
        _get_env(self._caller)
        _set_env(_REFERENCE)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        _set_env(self._caller)
