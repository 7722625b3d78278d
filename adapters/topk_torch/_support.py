"""What the adapter relies on, by torch release.

The operators and their derivatives (autograd, `torch.func`) work from
torch 2.4, the floor of the ``torch`` extra.  `torch.compile` of the
operators, and the solvers' compiled loops (`topk_torch._fused`), are tested
from `COMPILE_FLOOR` on: older Dynamo cannot trace the adapter's routing
(``torch._C._are_functorch_transforms_active``, torch 2.4) and returned stale
or wrong values for some compiled graphs.  There the four operators are
excluded from compilation (`torch.compiler.disable`: they run eagerly inside
a compiled function, a graph break; ``fullgraph=True`` refuses) and the
solvers' loops run eagerly.  ``bash .ci/torch_floor.sh VERSION`` runs the
torch tests on a release.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

COMPILE_FLOOR = (2, 8)


def torch_release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string such as ``"2.4.1+cpu"``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a torch version: {version!r}")
    return int(match[1]), int(match[2])


COMPILES = torch_release(torch.__version__) >= COMPILE_FLOOR


def compiled_from_the_floor(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` itself, or on a torch older than `COMPILE_FLOOR` `fn` excluded from compilation (it runs eagerly
    inside compiled functions)."""
    return fn if COMPILES else torch.compiler.disable(fn)


def tracing() -> bool:
    """Whether a tracer records the calls: Dynamo (which reaches an `autograd.Function`'s forward when it
    compiles frames that eager code under a `torch.func` transform entered), make_fx's proxy mode (which
    AOTAutograd's trace of a backward uses: `torch.compiler.is_compiling` is False there before torch
    2.13), a fake mode."""
    if torch.compiler.is_compiling():
        return True
    return (torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None)
