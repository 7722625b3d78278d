"""8 x 8 block transposes in vector registers, between input rows and the lane layout of `lanes`.

The lane solver works on groups of `lanes.LANES` rows transposed, one row per
SIMD lane (entry j of every row in row j of the group).  Written as loops,
the transposition is a scalar load and store per entry whose stores (or
loads) are a row of the group apart, and the compiler does not vectorize it:
for float32 rows of 64 entries it took about a fifth of the lane solver's
time each way.  Here eight rows of eight entries are loaded as eight
vectors, transposed by three rounds of shuffles (pairs of entries, pairs of
pairs, halves: the classic 8 x 8 transposition), converted to the
destination's dtype (exactly, float32 to float64; rounded to nearest,
float64 to float32, as a scalar store would) and stored as eight vectors.
LLVM's `shufflevector` is target-independent: it becomes the target's own
shuffles (unpack, shuffle and lane permutes on x86).

Both functions read and write eight consecutive entries along the last axis
of their arrays, which must be contiguous along it (the callers check).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

BLOCK = 8
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
# The three rounds: interleave single entries of two rows, then pairs, then 4-entry halves (indices
# 0-7 pick from the first vector, 8-15 from the second).
_SINGLES = ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15])
_PAIRS = ([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])
_HALVES = ([0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, BLOCK), [ir.Constant(_I32, m) for m in mask]))


def _transposed(builder, vectors):
    """The columns of the 8 x 8 block whose rows are `vectors`, as 8 vectors."""
    singles = []
    for i in range(0, BLOCK, 2):  # rows (i, i + 1): entries 0 1 4 5, then 2 3 6 7, interleaved
        singles += [_shuffle(builder, vectors[i], vectors[i + 1], mask) for mask in _SINGLES]
    quads = []
    for h in (0, 4):  # rows 0-3, then rows 4-7: column c in one half of the vector, c + 4 in the other
        lo01, hi01, lo23, hi23 = singles[h:h + 4]
        quads += [_shuffle(builder, lo01, lo23, _PAIRS[0]), _shuffle(builder, lo01, lo23, _PAIRS[1]),
                  _shuffle(builder, hi01, hi23, _PAIRS[0]), _shuffle(builder, hi01, hi23, _PAIRS[1])]
    columns = [None] * BLOCK
    for c in range(4):
        columns[c] = _shuffle(builder, quads[c], quads[4 + c], _HALVES[0])
        columns[c + 4] = _shuffle(builder, quads[c], quads[4 + c], _HALVES[1])
    return columns


def _address(context, builder, array_type, array, i, j, vector):
    """A pointer to `vector` (a vector type) at entry [i, j] of a 2-d array."""
    ary = context.make_array(array_type)(context, builder, array)
    strides = cgutils.unpack_tuple(builder, ary.strides, 2)
    offset = builder.add(builder.mul(i, strides[0]), builder.mul(j, strides[1]))
    return builder.inttoptr(builder.add(builder.ptrtoint(ary.data, _I64), offset), vector.as_pointer())


def _converted(builder, value, target):
    if value.type == target:
        return value
    widen = isinstance(value.type.element, ir.FloatType)  # float32 to float64
    return builder.fpext(value, target) if widen else builder.fptrunc(value, target)


def _float_matrices(*arrays):
    # The typing rule of both intrinsics: 2-d float32 or float64 arrays (else no signature).
    return all(isinstance(a, types.Array) and a.ndim == 2 and a.dtype in (types.float32, types.float64)
               for a in arrays)


def _row_index(context, builder, rows_type, rows, first, lane):
    """The row index ``rows[first + lane]`` (an int64 array)."""
    index = context.make_array(rows_type)(context, builder, rows)
    return builder.load(builder.gep(index.data, [builder.add(first, ir.Constant(_I64, lane))]))


def _vector_types(context, source, destination):
    return (ir.VectorType(context.get_data_type(source.dtype), BLOCK),
            ir.VectorType(context.get_data_type(destination.dtype), BLOCK))


@intrinsic
def rows_to_lanes(typingctx, src, rows, first, j0, dst):
    """``dst[j0 + c, first + l] = src[rows[first + l], j0 + c]`` for c, l in 0..7 (to dst's dtype).

    `src` (batch, n) and `dst` (n, LANES): float32 or float64, contiguous along their last axis;
    `rows` int64 row indices.
    """
    if not _float_matrices(src, dst):
        return None

    def codegen(context, builder, signature, args):
        src_t, rows_t, _, _, dst_t = signature.args
        src_v, rows_v, first_v, j0_v, dst_v = args
        load_t, store_t = _vector_types(context, src_t, dst_t)
        vectors = []
        for lane in range(BLOCK):
            r = _row_index(context, builder, rows_t, rows_v, first_v, lane)
            vectors.append(builder.load(_address(context, builder, src_t, src_v, r, j0_v, load_t), align=4))
        for c, column in enumerate(_transposed(builder, vectors)):
            pointer = _address(context, builder, dst_t, dst_v, builder.add(j0_v, ir.Constant(_I64, c)), first_v,
                               store_t)
            builder.store(_converted(builder, column, store_t), pointer, align=4)
        return context.get_dummy_value()

    return types.void(src, rows, types.int64, types.int64, dst), codegen


@intrinsic
def lanes_to_rows(typingctx, src, j0, first, dst, rows):
    """``dst[rows[first + l], j0 + c] = src[j0 + c, first + l]`` for c, l in 0..7 (to dst's dtype).

    The inverse of `rows_to_lanes`: `src` (n, LANES), `dst` (batch, n).
    """
    if not _float_matrices(src, dst):
        return None

    def codegen(context, builder, signature, args):
        src_t, _, _, dst_t, rows_t = signature.args
        src_v, j0_v, first_v, dst_v, rows_v = args
        load_t, store_t = _vector_types(context, src_t, dst_t)
        vectors = []
        for c in range(BLOCK):
            pointer = _address(context, builder, src_t, src_v, builder.add(j0_v, ir.Constant(_I64, c)), first_v,
                               load_t)
            vectors.append(builder.load(pointer, align=4))
        for lane, row in enumerate(_transposed(builder, vectors)):
            r = _row_index(context, builder, rows_t, rows_v, first_v, lane)
            builder.store(_converted(builder, row, store_t), _address(context, builder, dst_t, dst_v, r, j0_v, store_t),
                          align=4)
        return context.get_dummy_value()

    return types.void(src, types.int64, types.int64, dst, rows), codegen
