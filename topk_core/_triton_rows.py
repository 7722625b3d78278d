"""Short rows solved whole in registers by Triton kernels: the threshold method's GPU fast path.

The threshold method of `_agnostic.threshold` runs as a few hundred
elementwise operations and row reductions, each of which reads the rows
again, and a loop whose iterations each end in a host read; on a GPU that
costs far more than the arithmetic (docs/benchmarks.md).  For rows of at
most `MAX_N` entries, these kernels load ``ROWS`` rows into registers (in
float64 whatever the input's dtype), solve each row's scalar equation of
spec section 5 there, and write the output and the residuals once: one read
of the input and one write of each output for the whole solve.

Per row (``g(e) = e^(q - 1)`` with ``e = u / l``, `_agnostic.regularizer`):

* **Order statistics.**  The row is sorted in registers (``tl.sort``) for
  its k-th and (k+1)-th largest keys ``c`` and ``c2`` (mask: ``x``;
  magnitude: ``|x|``).  They bracket the scalar and give its frame.
* **Mask**, relative to ``c`` (every free entry lies within ``l`` of it, so
  ``x - c`` keeps its digits): ``tau`` lies in ``[-l, c2 - c]`` (the top k
  keys saturated at the lower end, at most k units at the upper end).  When
  ``c - c2 >= l`` the threshold is not unique (spec section 6): ``tau = c2
  - c`` gives the exact 0/1 answer with an empty free set.
* **Magnitude**: ``t`` lies in ``[m, c2]``, with ``m`` below the saturation
  point of the k-th key (``min(c / 2, g(c / 2))``, raised to
  ``c - l c^(p - 1)``).  When the k-th key still saturates at ``t = c2`` the
  threshold is not unique and ``t = c2``; rows with at most k non-zero
  entries return ``x`` (``t = 0``).  The first solve is in the absolute
  frame (``t`` keeps its own relative precision, however far below the keys
  it lies); a row whose threshold lies within a factor 2 of a non-zero key
  is solved again in the frame of the key ``ref`` nearest to it, from the
  first root and its bracket: ``r = (|x| - ref) + delta`` with
  ``t = ref - delta``, from exact differences (``|x_i - ref| <= 2 r_i``).
* **Start.**  PAV's first block: the k-th and (k+1)-th keys free, the k - 1
  above saturated (p = 2: its closed form; p = 4/3: four Newton steps on its
  cubic, `_cubic_first_block`; other p: four on its equation raised to the
  power 1/(q - 1), `_general_first_block`).
* **Root.**  Safeguarded Newton (Numerical Recipes' rtsafe: a Newton step
  is taken when it lands inside the bracket and at most halves the step
  before last, else the bracket is split: at its midpoint, or for the
  magnitude's first solve at the geometric mean of t's ends where they
  differ by more than 4x), on ``sum(y) - k``, which is monotone and
  piecewise smooth in the scalar; the step of a support piece is taken on
  ``(sum_F g)^(1/(q-1))``, as in the Array-API method, and the p = 2
  magnitude's is the root on the current sets (PAV's closed form).  A row stops when
  ``|sum(y) - k|`` is within the rounding of the sum, when its step falls
  below 4 ulps of its scale, or when its bracket is 8 ulps wide: the scalar
  is then exact to float64 precision, which is the polish.  ``MAX_ITER``
  bounds the loop.

* **p > 2** (``q < 2``, where ``g`` is steep at 0 and an ulp of the
  threshold moves the output of a key next to it by far more than an ulp):
  the mask is solved again in the frame of the key nearest to its
  threshold (``tau`` relative to that key, its steps and bracket small next
  to `_near_key`), the magnitude's second solve resolves ``delta`` down to
  `_near_key` as well; rows whose sum of weights still misses k by more
  than 512 ulps (no float threshold meets it, e.g. p = 50) are handed back,
  and the Array-API method interpolates them between their bracket's ends.

Each kernel also writes a per-row int8 status: -1 for rows with a non-finite
entry, rows that did not converge or met a non-finite intermediate, and the
unresolved rows above, which the caller leaves to the Array-API threshold
method (its NaN and infinity policy is the library's); else the iterations
of the row's root finder (at most 127; `benchmarks/triton_iterations.py`
reads them).  The residuals are
those of the Array-API threshold method, in input order: ``g'`` on the free
set (mask and magnitude), the set codes (`_agnostic.residuals.mag_codes`) and
``offset = k - |A|`` (magnitude).

This module needs Triton >= 3.2 (`MIN_TRITON`; with an older one its import
raises `ImportError` and the adapter keeps the Array-API route); the PyTorch
adapter imports it on demand (`topk_torch._triton_rows`).  With
``TRITON_INTERPRET=1`` set before the import, the kernels run on CPU tensors
through Triton's interpreter, which is how the test suite checks them
without a GPU (Triton 3.5 to 3.9: `.ci/torch_floor.sh`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._agnostic.threshold import _FTOL_ULPS, _UNRESOLVED_MISS

# The oldest Triton the kernels run on (3.0 rejects them: tl.arange of non-constexpr bounds).
MIN_TRITON = (3, 2)
if tuple(int(part) for part in triton.__version__.split(".")[:2]) < MIN_TRITON:
    raise ImportError(f"the threshold method's Triton kernels need Triton >= {'.'.join(map(str, MIN_TRITON))}; "
                      f"found {triton.__version__}")

# Longest rows the kernels take (a power of two: the register block of one row).
MAX_N = 4096
# Exponent modes of the kernels (compile-time): q = 2 (g linear), q = 4 (p = 4/3, g cubic), any q.
MODE_LINEAR, MODE_CUBIC, MODE_GENERAL = 1, 3, 0
# A program's share of the rows: float64 entries per thread and array, and entries per program
# (`block_shape`).
ENTRIES_PER_THREAD = 2
PROGRAM_ENTRIES = 256
# Iterations of the root finder before a row is handed back (bisection alone would need about 60
# from a bracket of width l down to 8 float64 ulps).
MAX_ITER = 100
# Arguments that change from call to call: Triton does not specialize the kernels on their values
# (by default it compiles a variant for integers divisible by 16 and another for 1).
_VARYING = ("batch", "n", "k")
# float64's machine epsilon; the kernels multiply tensors by it (tensor * constant: Triton 3.7's interpreter
# failed on constant * tensor, "cannot convert ... to tensor").
_EPS = tl.constexpr(2.220446049250313e-16)
# The set code of entries returned unchanged (`_agnostic.residuals.KEPT_CODE`; a constant of the kernels).
KEPT_CODE = tl.constexpr(2)
# Ulps of k by which a p > 2 row's sum may miss k before it is handed back (the Array-API method's bound).
_UNRESOLVED_ULPS = tl.constexpr(_UNRESOLVED_MISS * _FTOL_ULPS)


def exponent_mode(q: float) -> int:
    """The kernels' exponent mode for the conjugate exponent `q`."""
    if q == 2.0:
        return MODE_LINEAR
    if q == 4.0:
        return MODE_CUBIC
    return MODE_GENERAL


def block_shape(n: int) -> tuple[int, int, int]:
    """``(BLOCK, ROWS, num_warps)`` for rows of `n` entries: the row padded to a power of two, and
    two float64 entries per thread and array: ``ROWS`` rows of ``BLOCK`` over ``num_warps`` warps
    of 32 threads (at least 256 entries per program, at most 16 warps).

    Compiled for sm_90 (H100, H200; `benchmarks/triton_registers.py`, no GPU needed), eight
    entries per thread (1024 per program over 4 warps, the first rule) took all 255 registers
    and spilled 544-704 bytes per thread in the magnitude's kernel at n = 16 and 64; four took
    224-242 registers there, two 126-140 and at most 16 bytes of stack (none at n = 16 and
    256).  Fewer registers let more warps share an SM, and fewer rows per program make its
    slowest row, which all its rows wait for, less slow.  Rows of 2048 and 4096 entries take
    four and eight per thread over 16 warps (at 512 threads a thread has at most 128 registers):
    32 warps spilled as much or more."""
    block = max(16, triton.next_power_of_2(n))
    rows = max(1, PROGRAM_ENTRIES // block)
    warps = min(16, block * rows // (32 * ENTRIES_PER_THREAD))
    return block, rows, warps


def compiles_ahead() -> bool:
    """Whether this Triton's compiler API is the one `compile_ahead` calls (constants passed as ``constexprs``)."""
    import inspect

    from triton.compiler import ASTSource

    return "constexprs" in inspect.signature(ASTSource).parameters


def compile_ahead(kind: str, n: int, q: float, dtype: str, arch: int, residuals: bool = True,
                  shape: tuple[int, int, int] | None = None) -> object:
    """The kernel of `kind` ("mask" or "mag") for rows of `n` entries of `dtype` (Triton's name:
    "fp32", "bf16", ...) and exponent `q`, compiled for the NVIDIA architecture `arch` (80: A100,
    90: H100/H200) without a GPU: Triton's compiler and the ``ptxas`` its wheel ships.  Returns
    Triton's compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``); `shape` replaces `block_shape`'s.

    What the interpreter cannot show: that the kernels compile for a GPU (their float64
    arithmetic, ``tl.sort``, the loops), and their registers and spills
    (`benchmarks/triton_registers.py`).  Needs this module imported without ``TRITON_INTERPRET``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = mask_rows_kernel if kind == "mask" else mag_rows_kernel
    if not hasattr(kernel, "src"):
        raise RuntimeError("compile_ahead needs the kernels imported without TRITON_INTERPRET=1")
    if not compiles_ahead():
        raise RuntimeError(f"compile_ahead needs a Triton whose ASTSource takes constexprs (as 3.9 does); "
                           f"this is {triton.__version__}")
    block, rows, warps = shape or block_shape(n)
    constants = {"BLOCK": block, "ROWS": rows, "MODE": exponent_mode(q), "RESIDUALS": residuals,
                 "MAX_ITER": MAX_ITER}
    pointers = {"params_ptr": "*fp64", "status_ptr": "*i8", "codes_ptr": "*i8"}
    signature = {name: pointers.get(name, f"*{dtype}") if name.endswith("_ptr") else "i32"
                 for name in kernel.arg_names if name not in constants}
    signature.update(dict.fromkeys(constants, "constexpr"))
    return triton.compile(ASTSource(kernel, signature, constexprs=constants),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


@triton.jit
def _g(e, qm1, MODE: tl.constexpr):
    """``e^(q - 1)`` for ``e >= 0``."""
    if MODE == 1:
        return e
    elif MODE == 3:
        return e * e * e
    else:
        return tl.where(e > 0, tl.exp2(qm1 * tl.log2(tl.maximum(e, 1e-300))), 0.0)


@triton.jit
def _g_inverse(v, qm1, MODE: tl.constexpr):
    """``v^(1 / (q - 1))`` for ``v > 0`` (the saturation width at level `v`, over l)."""
    if MODE == 1:
        return v
    else:
        return tl.exp2(tl.log2(v) / qm1)


@triton.jit
def _g_prime(e, qm1, lam, MODE: tl.constexpr):
    """``g'(u) = (q - 1) / l e^(q - 2)`` at ``e = u / l > 0``."""
    if MODE == 1:
        return e * 0.0 + 1.0 / lam
    elif MODE == 3:
        return 3.0 / lam * e * e
    else:
        return qm1 / lam * tl.exp2((qm1 - 1.0) * tl.log2(tl.maximum(e, 1e-300)))


@triton.jit
def _split(lo, hi, GEOMETRIC: tl.constexpr):
    """The point that halves the bracket ``[lo, hi]``: its midpoint or, with `GEOMETRIC` (a bracket
    ``lo < hi < 0`` of ``-t``), the geometric mean of t's ends where they differ by more than 4x."""
    mid = 0.5 * (lo + hi)
    if GEOMETRIC:
        far = (lo < 4.0 * hi) & (hi < 0)
        geometric = -tl.exp2(0.5 * (tl.log2(-lo) + tl.log2(tl.maximum(-hi, 1e-300))))
        return tl.where(far, geometric, mid)
    else:
        return mid


@triton.jit
def _newton_step(f, slope, target, qm1, MODE: tl.constexpr):
    """The Newton step of the current support piece, taken on ``(sum_F g)^a = T^a`` with ``a = 1 / (q - 1)``.

    ``T = k - |saturated|`` and ``sum_F g = f + T``: exact when one entry is
    free, and it does not crawl where g is flat (q > 2) or steep (q < 2) at 0
    (as in `_agnostic.threshold`); plain Newton on `f` where ``T <= 0`` or the
    free entries add nothing.  Returns the step and whether there is one.
    """
    usable = slope > 0
    plain = -f / tl.where(usable, slope, 1.0)
    if MODE == 1:
        return tl.where(usable, plain, 0.0), usable
    else:
        free_sum = f + target
        piece = usable & (target > 0) & (free_sum > 0)
        ratio = tl.where(piece, target / tl.where(piece, free_sum, 1.0), 1.0)
        # -(G^a - T^a) / (a G^(a - 1) G') = -G (1 - (T / G)^a) / (a G')
        step = -free_sum * (1.0 - tl.exp2(tl.log2(ratio) / qm1)) * qm1 / tl.where(usable, slope, 1.0)
        return tl.where(piece, step, tl.where(usable, plain, 0.0)), usable


@triton.jit
def _rtsafe(f, slope, target, exact, scalar, lo, hi, step_old, run, scale, ftol, qm1, MODE: tl.constexpr,
            GEOMETRIC: tl.constexpr, EXACT: tl.constexpr):
    """One safeguarded Newton step for the rows `run`.

    `f` and `slope` are the value and derivative of an increasing function of
    `scalar` whose root lies in ``[lo, hi]``, `target` the count that the free
    entries of the current piece must make up (`_newton_step`), and with `EXACT` `exact` the
    root on the current piece (NaN: none), which then replaces the Newton step; returns the new
    scalar, bracket and step, and whether the row has converged: ``|f| <= ftol`` (f is
    ``sum(y) - k``, and every ``y_i`` is monotone in the scalar, so this bounds
    the L1 error of ``y``; below the rounding of the sum, Newton steps are
    noise), a step (proposed or taken) below 4 ulps of `scale`, or a bracket 8 ulps wide.
    """
    lo = tl.where(run & (f < 0), scalar, lo)
    hi = tl.where(run & (f > 0), scalar, hi)
    if EXACT:
        usable = exact == exact
        step = tl.where(usable, exact - scalar, 0.0)
    else:
        step, usable = _newton_step(f, slope, target, qm1, MODE)
    candidate = scalar + step
    newton = usable & (candidate > lo) & (candidate < hi) & (2.0 * tl.abs(step) <= tl.abs(step_old))
    new = tl.where(newton, candidate, _split(lo, hi, GEOMETRIC))
    # A step within rounding of the scalar settles it where it is: such a step can land on (or past) the
    # bracket's end that the scalar has just become (an exact step at the root, whose f missed ftol by
    # its rounding), and bisecting toward that end again took 45 iterations.
    settled = (tl.abs(f) <= ftol) | (usable & (tl.abs(step) <= scale * (4.0 * _EPS)))
    new = tl.where(settled, scalar, new)
    moved = new - scalar
    width = hi - lo
    converged = settled | (tl.abs(moved) <= scale * (4.0 * _EPS)) | (width <= scale * (8.0 * _EPS))
    # A non-finite value or slope never converges: the row is handed back.
    converged = converged & (tl.abs(f) < float("inf")) & (tl.abs(slope) < float("inf"))
    scalar = tl.where(run, new, scalar)
    step_old = tl.where(run, moved, step_old)
    return scalar, lo, hi, step_old, converged


@triton.jit
def _mask_pieces(d, tau, lam, qm1, MODE: tl.constexpr):
    """At `tau` (relative to the frame of `d`): ``e = max(d - tau, 0) / l``, ``e`` capped at 1, and ``y``."""
    e = tl.maximum((d - tau[:, None]) / lam, 0.0)
    ec = tl.minimum(e, 1.0)
    return e, ec, _g(ec, qm1, MODE)


@triton.jit
def _mask_sums(d, tau, k, lam, qm1, MODE: tl.constexpr):
    """``sum(y) - k`` at `tau` (relative to the frame of `d`), ``-d/dtau`` of it, and k less the saturated count."""
    e, ec, y = _mask_pieces(d, tau, lam, qm1, MODE)
    free = (e > 0) & (e < 1)
    f = tl.sum(y, axis=1) - k
    slope = tl.sum(tl.where(free, _g_prime(ec, qm1, lam, MODE), 0.0), axis=1)
    target = k - tl.sum((e >= 1).to(tl.float64), axis=1)
    return f, slope, target


@triton.jit
def _ftol(n, k):
    """The miss of ``sum(y) = k`` that counts as the root: the rounding of a sum of n terms, and 8 ulps of k."""
    return (n + 8.0 * k) * _EPS


@triton.jit
def _near_key(ftol, lam, qm1):
    """How close to a key a threshold is resolved in that key's frame (p > 2): where the key's output is
    `ftol`, ``s ftol^(1 / (q - 1))`` from it at the strength ``s = lam`` (the mask: l; the magnitude: the
    saturation width), and at least the smallest normal number (`_agnostic.threshold._near`)."""
    return tl.maximum(lam * tl.exp2(tl.log2(ftol) / qm1), 2.2250738585072014e-308)


@triton.jit
def _unresolved(weights, k, qm1):
    """Rows whose sum of weights (``sum(y)``; the magnitude's ``y = z / t``) misses k by more than 512 ulps
    of k at the root found, for p > 2 (``q - 1 < 1``): no float threshold meets k there (``g`` is steep
    at 0, and an entry's ``u = l y^(p - 1)`` lies below its key's rounding).  They are handed back to
    the Array-API method, which interpolates between the bracket's ends (`_agnostic.threshold`'s
    ``_unresolved_rows``, the same bound)."""
    far = tl.abs(weights - k) > tl.maximum(k * 1.0, 1.0) * (_UNRESOLVED_ULPS * _EPS)
    return far & (weights * 0.0 + qm1 < 1.0)  # (a row flag: the interpreter's & takes no scalar flag)


@triton.jit
def _status(handed_back, iterations):
    """A row's int8 status: -1 where the row is handed back, else its root finder's iterations (at most 127)."""
    return tl.where(handed_back, -1, tl.minimum(iterations, 127)).to(tl.int8)


@triton.jit
def _load_rows(x_ptr, params_ptr, batch, n, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's rows in float64 (0 outside the rows), their indices and masks, which rows hold a
    non-finite entry, and the parameters ``(l, q - 1)``."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    in_rows = rows < batch
    valid = in_rows[:, None] & (cols[None, :] < n)
    offs = rows[:, None].to(tl.int64) * n + cols[None, :]
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float64)
    finite = tl.abs(x) < float("inf")
    bad = tl.max((valid & ~finite).to(tl.int32), axis=1) > 0
    lam = tl.load(params_ptr)
    qm1 = tl.load(params_ptr + 1)
    return rows, cols, in_rows, valid, offs, x, finite, bad, lam, qm1


@triton.jit
def _order_statistics(keys, cols, k):
    """The k-th and (k+1)-th largest keys of each row (k < n)."""
    s = tl.sort(keys, dim=1, descending=True)
    kth = tl.sum(tl.where(cols[None, :] == k - 1, s, 0.0), axis=1)
    next_ = tl.sum(tl.where(cols[None, :] == k, s, 0.0), axis=1)
    return kth, next_


@triton.jit
def _rounded_to_saturation(keys, sat, free, k):
    """The entries read as saturated (`sat`) that are free: where k or more are next to free entries, the
    smallest of them (with its ties), its ``y`` (mask) or ``z / t`` (magnitude) rounded to 1; left
    saturated, the mask's Jacobian lost its g' and the magnitude's offset k - |A| its 1 (the Array-API
    method's `_agnostic.threshold._rounded_to_saturation`)."""
    surplus = (tl.sum(sat.to(tl.int32), axis=1) >= k) & (tl.max(free.to(tl.int32), axis=1) > 0)
    low_sat = tl.min(tl.where(sat, keys, float("inf")), axis=1)
    return surplus[:, None] & sat & (keys == low_sat[:, None])


@triton.jit
def _nearest_key(keys, usable, point):
    """Per row, the `usable` key nearest to `point` (the largest of equally near ones): the reference of
    a second solve's frame."""
    dist = tl.where(usable, tl.abs(keys - point[:, None]), float("inf"))
    nearest = tl.min(dist, axis=1)
    return tl.max(tl.where(dist == nearest[:, None], keys, float("-inf")), axis=1)


@triton.jit
def _cubic_first_block(a0, a1, offset, slope, start):
    """The root u of ``(a0 - u)^3 + (a1 - u)^3 = offset + slope u`` (``a0 >= a1 > u``, slope >= 0) by
    Newton steps from `start`: PAV's first block for p = 4/3 (the k-th and (k+1)-th keys free, the
    k - 1 above saturated), the kernels' start.  The left side less the right is convex and
    decreasing in u there, so from any start the steps approach the root from below after the
    first; from the bracket's lower end four are usually close enough that the root finder's first
    evaluation confirms them, and it polishes the others (it need not be exact: a start)."""
    u = start
    for _ in tl.static_range(4):
        r0 = a0 - u
        r1 = a1 - u
        h = r0 * r0 * r0 + r1 * r1 * r1 - offset - slope * u
        dh = 3.0 * (r0 * r0 + r1 * r1) + slope
        u = u + h / dh
    return u


@triton.jit
def _general_first_block(a0, a1, level, scale, lo, hi, qm1):
    """PAV's first block for any other q (the k-th and (k+1)-th keys free, the k - 1 above saturated),
    the kernels' start: the root v in ``[lo, hi]`` of ``(r0^(q-1) + r1^(q-1))^a = level + scale v^a``,
    ``r = max(a - v, 0)``, ``a = 1 / (q - 1)`` (``a0 >= a1``; the mask: u = tau / l, level 1, scale 0;
    the magnitude: v = t, level 0, scale l).  Newton steps from `lo`, clamped to the bracket, on the
    equation raised to the power a, as the root finder takes its steps (`_newton_step`): the left side
    is then homogeneous of degree 1 in r, linear where one key is free.  Both sides less each other
    are convex (q > 2) or concave (q < 2) and decreasing, so the steps approach the root monotonically
    (for q < 2, from above after the first); a step that is not finite keeps the point it started
    from.  Two powers per step and row, next to two per entry for an evaluation of the row."""
    a = 1.0 / qm1
    v = lo
    for _ in tl.static_range(4):
        r0 = tl.maximum(a0 - v, 0.0)
        r1 = tl.maximum(a1 - v, 0.0)
        p0 = _g(r0, qm1, 0)
        p1 = _g(r1, qm1, 0)
        total = p0 + p1
        norm = tl.exp2(a * tl.log2(tl.maximum(total, 1e-300)))
        # d/dv of the left side: -(r0^(q-2) + r1^(q-2)) norm^(1-(q-1)), with r^(q-2) = r^(q-1) / r.
        weights = tl.where(r0 > 0, p0 / tl.maximum(r0, 1e-300), 0.0)
        weights += tl.where(r1 > 0, p1 / tl.maximum(r1, 1e-300), 0.0)
        right = tl.exp2(a * tl.log2(tl.maximum(v, 1e-300)))
        h = norm - level - scale * right
        dh = -weights * norm / tl.maximum(total, 1e-300) - scale * a * right / tl.maximum(v, 1e-300)
        new = v - h / dh
        new = tl.minimum(tl.maximum(new, lo), hi)
        v = tl.where(new == new, new, v)
    return v


@triton.jit(do_not_specialize=_VARYING)
def mask_rows_kernel(
    x_ptr, params_ptr, y_ptr, gp_ptr, status_ptr, batch, n, k,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, MODE: tl.constexpr, RESIDUALS: tl.constexpr,
    MAX_ITER: tl.constexpr,
):
    """Soft top-k mask of contiguous (batch, n) rows, ``1 <= k < n``; params: ``(l, q - 1)`` in float64."""
    rows, cols, in_rows, valid, offs, x, finite, bad, lam, qm1 = _load_rows(x_ptr, params_ptr, batch, n, ROWS, BLOCK)
    keys = tl.where(valid & finite, x, float("-inf"))
    c, c2 = _order_statistics(keys, cols, k)
    idle = bad | ~in_rows  # no keys to solve for (rows past the batch are padding)
    c = tl.where(idle, 0.0, c)
    c2 = tl.where(idle, 0.0, c2)
    d = keys - c[:, None]

    lo = c * 0.0 - lam
    hi = c2 - c
    flat = hi <= lo  # k keys clear of the rest by a saturating gap: the exact 0/1 answer
    # PAV's first block: the k-th and (k+1)-th keys free, the k - 1 above saturated (the midpoint
    # for p = 2); for p = 4/3, (0 - u)^3 + (gap / l - u)^3 = 1 at u = tau / l (gap = c2 - c).
    start = 0.5 * (lo + hi)
    if MODE == 3:
        # From u = -1 (tau = -l, the bracket's lower end); u stays within [-1, 0], as gap / l does.
        u = _cubic_first_block(c * 0.0, hi / lam, 1.0, 0.0, c * 0.0 - 1.0)
        start = tl.minimum(tl.maximum(lam * u, lo), hi)
    elif MODE == 0:
        u = _general_first_block(c * 0.0, hi / lam, 1.0, 0.0, c * 0.0 - 1.0, hi / lam, qm1)
        start = tl.minimum(tl.maximum(lam * u, lo), hi)
    tau = tl.where(flat, hi, start)
    ftol = _ftol(n, k)
    neg_tau, neg_hi, neg_lo, solved, iterations = _solve(
        d, c, -tau, -hi, -lo, ~idle & ~flat, k, lam, qm1, ftol, lam, MODE, MAX_ITER, False, False
    )
    tau = -neg_tau
    if MODE == 0:
        # p > 2 (q < 2): g is steep at 0, and an ulp of tau relative to c moves the output of a key
        # near the threshold by (ulp / l)^(q - 1) (p = 4, l = 1: sum(y) missed k by 6e-13, 700 ulps).
        # Solved again in the frame of the key nearest to the threshold, as in the Array-API method
        # (`_agnostic.threshold._mask_recentre`), where tau keeps its digits down to `_near_key`.
        again = solved & ~flat & (c * 0.0 + qm1 < 1.0)
        ref = tl.where(again, _nearest_key(keys, valid & finite, c + tau), c)
        shift = c - ref
        # Phase 1's bracket in the new frame, widened by the rounding of the keys and of the shift.
        pad = (tl.abs(neg_hi) + tl.abs(neg_lo) + tl.abs(c) + tl.abs(ref) + lam) * (8.0 * _EPS)
        lo2 = -neg_lo + shift - pad
        hi2 = -neg_hi + shift + pad
        d2 = keys - ref[:, None]
        start2 = tl.minimum(tl.maximum(tau + shift, lo2), hi2)
        neg_tau2, _, _, solved2, iterations2 = _solve(
            d2, ref, -start2, -hi2, -lo2, again, k, lam, qm1, ftol, _near_key(ftol, lam, qm1), MODE, MAX_ITER, False,
            False,
        )
        d = tl.where(again[:, None], d2, d)
        tau = tl.where(again, -neg_tau2, tau)
        solved = tl.where(again, solved2, solved)
        iterations += iterations2

    _, ec, y = _mask_pieces(d, tau, lam, qm1, MODE)
    free = (y > 0) & (y < 1)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=valid)
    if RESIDUALS:
        free = free | _rounded_to_saturation(d, valid & (y >= 1), free, k)
        gp = tl.where(free, _g_prime(ec, qm1, lam, MODE), 0.0)
        tl.store(gp_ptr + offs, gp.to(gp_ptr.dtype.element_ty), mask=valid)
    handed_back = bad | ~(solved | flat)
    if MODE == 0:
        handed_back = handed_back | (solved & ~flat & _unresolved(tl.sum(y, axis=1), k, qm1))
    tl.store(status_ptr + rows, _status(handed_back, iterations), mask=in_rows)


@triton.jit
def _mag_pieces(d, ref, delta, lam, qm1, MODE: tl.constexpr):
    """At ``t = ref - delta``: t, the saturation width w, ``r = max(d + delta, 0)``, the saturated set,
    ``r`` capped at w, ``z = g(r)`` and the free set."""
    t = ref - delta
    w = lam * _g_inverse(t, qm1, MODE)
    r = tl.maximum(d + delta[:, None], 0.0)
    # (r > 0: where w underflows to 0, keys at or below t, whose r is 0, counted as saturated: float64
    # rows spanning 500 orders at p = 3 kept every non-zero entry, reported converged.)
    sat = (r >= w[:, None]) & (r > 0)
    rc = tl.minimum(r, w[:, None])
    z = _g(rc / lam, qm1, MODE)
    free = (r > 0) & ~sat
    return t, w, r, sat, rc, z, free


@triton.jit
def _mag_sums(d, ref, delta, k, lam, qm1, MODE: tl.constexpr):
    """``sum(y) - k`` at ``t = ref - delta`` (``r = d + delta``), its derivative in delta, k less the
    saturated count T, the saturation width, and for p = 2 the root on the current sets (NaN: no
    free entry; else `delta`): ``sum_F r = T l t``, that is ``delta = (T l ref - sum_F d) / (|F| + T l)``
    (PAV's closed form of the block F, as the CPU's lane solver takes it)."""
    t, w, _, sat, rc, z, free = _mag_pieces(d, ref, delta, lam, qm1, MODE)
    tt = t[:, None]
    y = tl.where(sat, 1.0, z / tt)
    f = tl.sum(y, axis=1) - k
    slope = tl.sum(tl.where(free, (_g_prime(rc / lam, qm1, lam, MODE) + z / tt) / tt, 0.0), axis=1)
    target = k - tl.sum(sat.to(tl.float64), axis=1)
    exact = delta
    if MODE == 1:
        n_free = tl.sum(free.to(tl.float64), axis=1)
        free_d = tl.sum(tl.where(free, d, 0.0), axis=1)
        weight = target * lam
        exact = tl.where(n_free > 0, (weight * ref - free_d) / (n_free + weight), float("nan"))
    return f, slope, target, w, exact


@triton.jit
def _solve(
    d, ref, scalar, lo, hi, active, k, lam, qm1, ftol, resolution, MODE: tl.constexpr, MAX_ITER: tl.constexpr,
    MAG: tl.constexpr, GEOMETRIC: tl.constexpr,
):
    """The root in ``[lo, hi]`` of ``sum(y) - k`` for the `active` rows, as an increasing function of
    `scalar`: the magnitude's ``delta`` (`MAG`; ``t = ref - delta``) or minus the mask's ``tau`` (sum(y)
    decreases in tau), whose steps and bracket count as small next to ``|tau| + resolution`` (the
    magnitude: ``|delta| + min(w, t)``, w the saturation width, and for any other q than 2 and 4
    ``|delta| + min(w, t, resolution)``).  Returns
    ``(scalar, lo, hi, converged, iterations)``."""
    solved = active != active  # all False, in the shape and type of a row flag
    done = ~active
    step_old = hi - lo
    iterations = active.to(tl.int32) * 0
    while tl.max((~done).to(tl.int32), axis=0) > 0:
        run = ~done
        iterations += run.to(tl.int32)
        if MAG:
            f, slope, target, w, exact = _mag_sums(d, ref, scalar, k, lam, qm1, MODE)
            # The scale of delta's precision: t enters y = g(r) / t, and the free r lie within w (for
            # p > 2, within `resolution` where a key's frame resolves them further).
            scale = tl.abs(scalar) + tl.minimum(w, ref - scalar)
            if MODE == 0:
                scale = tl.abs(scalar) + tl.minimum(tl.minimum(w, ref - scalar), resolution)
        else:
            f, slope, target = _mask_sums(d, -scalar, k, lam, qm1, MODE)
            exact = scalar
            scale = tl.abs(scalar) + resolution
        # The p = 2 magnitude steps to the root on its current sets (y is not linear in t there); the
        # p = 2 mask's Newton step is that root already (y is piecewise linear in tau).
        scalar, lo, hi, step_old, converged = _rtsafe(
            f, slope, target, exact, scalar, lo, hi, step_old, run, scale, ftol, qm1, MODE, GEOMETRIC,
            MAG and MODE == 1,
        )
        solved = solved | (run & converged)
        # (A per-row count, not a Python int: a loop-carried value keeps one type in Triton.)
        done = done | solved | (iterations >= MAX_ITER)
    return scalar, lo, hi, solved, iterations


@triton.jit(do_not_specialize=_VARYING)
def mag_rows_kernel(
    x_ptr, params_ptr, y_ptr, gp_ptr, codes_ptr, offset_ptr, status_ptr, batch, n, k,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, MODE: tl.constexpr, RESIDUALS: tl.constexpr,
    MAX_ITER: tl.constexpr,
):
    """Soft top-k in magnitude of contiguous (batch, n) rows, ``1 <= k < n``; params: ``(l, q - 1)``."""
    rows, cols, in_rows, valid, offs, x, finite, bad, lam, qm1 = _load_rows(x_ptr, params_ptr, batch, n, ROWS, BLOCK)
    x = tl.where(finite, x, 0.0)
    keys = tl.where(valid, tl.abs(x), -1.0)  # padding below every key
    ak, ak1 = _order_statistics(keys, cols, k)
    ak1 = tl.maximum(ak1, 0.0)
    identity = ak1 <= 0  # at most k non-zero entries: t = 0, the output is x
    idle = identity | bad | ~in_rows  # no threshold to solve for (rows past the batch are padding)
    ak = tl.where(idle, 1.0, ak)
    ak1 = tl.where(idle, 0.5, ak1)

    # Phase 1, in the absolute frame (ref = 0, delta = -t), where t keeps its own precision: t lies
    # between the (k+1)-th key and a point below the saturation point of the k-th key.
    zero = ak * 0.0
    m = tl.minimum(0.5 * ak, _g(0.5 * ak / lam, qm1, MODE))
    m = tl.maximum(m, ak - lam * _g_inverse(ak, qm1, MODE))
    flat = _g((ak - ak1) / lam, qm1, MODE) >= ak1  # the k-th key still saturates at t = c2
    solve = ~idle & ~flat
    lo = -ak1
    hi = -m
    # A bracket that rounding closed: t lies within rounding of the (k+1)-th key, which phase 2
    # resolves in that key's frame.
    closed = solve & (hi <= lo)
    solve = solve & ~closed
    if MODE == 1:
        # p = 2: PAV's first block (the k-th and (k+1)-th keys free, the k - 1 above saturated).
        start = -tl.minimum(tl.maximum((ak + ak1) / (2.0 + lam), m), ak1)
    elif MODE == 3:
        # p = 4/3: the same block, ((ak - t)^3 + (ak1 - t)^3) / l^3 = t, from t = m; the bracket's split
        # where that overflows (keys near float64's largest; NaN: the interpreter's maximum keeps it).
        t0 = _cubic_first_block(ak, ak1, 0.0, lam * lam * lam, m)
        start = tl.where(t0 == t0, -tl.minimum(tl.maximum(t0, m), ak1), _split(lo, hi, True))
    else:
        # Any other p: the same block, from t = m (NaN: where its powers met an overflow).
        t0 = _general_first_block(ak, ak1, 0.0, lam, m, ak1, qm1)
        start = tl.where(t0 == t0, -tl.minimum(tl.maximum(t0, m), ak1), _split(lo, hi, True))
    delta = tl.where(solve, start, lo)
    ftol = _ftol(n, k)
    delta, lo, hi, solved, iterations = _solve(
        keys, zero, delta, lo, hi, solve, k, lam, qm1, ftol, float("inf"), MODE, MAX_ITER, True, True
    )
    solved = solved | closed

    # Phase 2, in the frame of the non-zero key nearest to the threshold, where that key lies within a
    # factor 2 of it: r = (|x| - ref) + delta from exact differences (|x_i - ref| <= 2 r_i near t).
    t1 = -delta
    ref = _nearest_key(keys, valid & (keys > 0), t1)
    again = solved & (ref >= 0.5 * t1) & (ref <= 2.0 * t1)
    ref = tl.where(again, ref, 0.0)
    pad = -lo * (8.0 * _EPS)
    d2 = keys - ref[:, None]
    lo2 = ref + lo - pad
    hi2 = tl.minimum(ref + hi + pad, ref + 0.5 * hi)
    # For p > 2 the free r next to the key resolve down to where its output is ftol (`_near_key` at the
    # saturation width; p = 5, l = 1: 2.5e-13 off with the width as the scale, as in phase 1).
    resolution = tl.where(qm1 < 1.0, _near_key(ftol, lam * _g_inverse(t1, qm1, MODE), qm1), float("inf"))
    delta2, _, _, solved2, iterations2 = _solve(
        d2, ref, ref - t1, lo2, hi2, again, k, lam, qm1, ftol, resolution, MODE, MAX_ITER, True, False
    )
    d = tl.where(again[:, None], d2, keys)
    delta = tl.where(again, delta2, delta)
    solved = tl.where(again, solved2, solved)
    iterations += iterations2

    # (Idle and flat rows kept delta = -ak1 < 0 from phase 1: t > 0 for every row.)
    t, _, r, sat, rc, z, free = _mag_pieces(d, ref, delta, lam, qm1, MODE)
    free = free & valid
    unresolved = solved != solved  # all False
    if MODE == 0:
        weights = tl.sum((sat & valid).to(tl.float64), axis=1) + tl.sum(tl.where(free, z, 0.0), axis=1) / t
        unresolved = solved & ~flat & ~identity & _unresolved(weights, k, qm1)
    sign = tl.where(x > 0, 1.0, -1.0)
    # |out| = z + r is below |x| on the free set, but its rounding can pass it: capped at |x| (float64 here).
    out = tl.where(sat, x, tl.where(free, sign * tl.minimum(z + r, tl.abs(x)), 0.0))
    # Rows with at most k non-zero entries: every entry kept when fewer than k are non-zero, else
    # the non-zero ones (the Array-API threshold method's convention).
    n_nonzero = tl.sum((valid & (keys > 0)).to(tl.int32), axis=1)
    kept = valid & ((n_nonzero < k)[:, None] | (keys > 0))
    identity2 = identity[:, None]
    out = tl.where(identity2, x, out)
    sat = tl.where(identity2, kept, sat & valid)
    free = free & ~identity2
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=valid)
    if RESIDUALS:
        demoted = _rounded_to_saturation(keys, sat, free, k)
        sat = sat & ~demoted
        free = free | demoted
        gp = tl.where(free, _g_prime(rc / lam, qm1, lam, MODE), 0.0)
        codes = tl.where(free, tl.where(x > 0, 1, -1), tl.where(sat, KEPT_CODE, 0))
        offset = tl.maximum(k - tl.sum(sat.to(tl.int32), axis=1), 0)
        tl.store(gp_ptr + offs, gp.to(gp_ptr.dtype.element_ty), mask=valid)
        tl.store(codes_ptr + offs, codes.to(tl.int8), mask=valid)
        tl.store(offset_ptr + rows, offset.to(offset_ptr.dtype.element_ty), mask=in_rows)
    finite_out = tl.max((valid & ~(tl.abs(out) < float("inf"))).to(tl.int32), axis=1) == 0
    handed_back = bad | ~(solved | flat | identity) | ~finite_out | unresolved
    tl.store(status_ptr + rows, _status(handed_back, iterations), mask=in_rows)
