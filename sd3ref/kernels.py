"""numba / blocked-BLAS fast paths for the primitives that dominate CPU time. Each function here has a
plain-NumPy twin of the same name in ``nn`` (the oracle); ``nn.use_kernels`` is the one switch that routes
``nn`` calls here, and tests/test_kernels.py checks twin against twin in float32 and float64.

Why they are faster: a NumPy expression such as LayerNorm + modulate makes ~8 passes over a (B, L, D)
array, each allocating a temporary; the numba kernels make one or two, in parallel over rows. Attention
never materialises more than ``ATTENTION_BUDGET`` bytes of logits per thread: queries are processed in
blocks, each block's full row of keys at once (so no online softmax is needed), both products in BLAS.

numba has no vector math library here (no SVML): a scalar ``math.exp`` in a loop is an opaque libm call
that stops vectorisation. ``_exp`` is built from arithmetic and a bit cast instead, so GELU, SiLU and the
softmax are each one vectorised pass, in the data's own precision.

Threads: numba's prange uses ``NUMBA_NUM_THREADS`` (default: all cores), OpenBLAS ``OPENBLAS_NUM_THREADS``
(default: all cores). The numba kernels never call BLAS, so the two pools take turns. The attention is the
one place that runs both: ``threads()`` Python threads each take a share of the heads and run BLAS
single-threaded in the calling thread (threadpoolctl limits BLAS to 1 thread for the call), so there are
never more busy threads than cores. Idle OpenBLAS workers spin after each product: ``sd3ref/__init__``
shortens that (OPENBLAS_THREAD_TIMEOUT) where it can. To share a machine, set both variables to the same
smaller count. numba's threading layer is "workqueue" unless ``NUMBA_THREADING_LAYER`` says otherwise:
the OpenMP layer's spinning workers fight OpenBLAS's for the cores (a LayerNorm of a 666×1536 array took
7-12 ms instead of 0.4 ms on 2 cores, measured by hand). workqueue does not allow parallel kernels to be
launched from two Python threads at once: the attention's threads call only serial, GIL-free ones.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from converters.tensors import BF16, to_float32

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# Reassociation lets LLVM vectorise the reductions; contraction allows FMA. No nnan/ninf: masks use -inf.
_JIT = dict(cache=True, parallel=True, fastmath={"reassoc", "contract"}, nogil=True)

ATTENTION_BUDGET = 4 << 20  # bytes of logits per block and thread (1-4 MiB within 10% at 512×512, by hand)


_LLVM = {types.float64: ir.DoubleType(), types.float32: ir.FloatType(),
         types.uint32: ir.IntType(32)}
_I32 = ir.IntType(32)


def _bitcast(source, target):
    """An intrinsic that reinterprets a ``source`` scalar's bits as ``target`` (same width): numba has no
    such operation, and a bit cast, unlike a table lookup or a libm call, keeps loops vectorisable."""
    @intrinsic
    def cast(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _LLVM[target])
        return target(source), codegen
    return cast


_float64_from_bits = _bitcast(types.int64, types.float64)
_float32_from_bits = _bitcast(types.uint32, types.float32)
_bits_from_float32 = _bitcast(types.float32, types.uint32)
_U = np.uint32


# exp(y) = 2**n · exp(r), y = n·ln2 + r, |r| ≤ ln2/2, ln2 split into a short "hi" part (n·hi is exact) and a
# "lo" correction (Cody-Waite); exp(r) by a Taylor polynomial; 2**n applied as two halves so that subnormal
# results and overflow to inf come out as libm's. Each precision computes in its own dtype: float32 logits
# stay float32 (16 lanes per AVX-512 vector instead of 8). Tested against NumPy's exp over the whole range.

@njit(inline="always", fastmath={"contract"})
def _exp_f64(y):
    """Within 2 ulp (tested; 1.2 by hand): degree 13, truncation r¹⁴/14! < 5e-18."""
    z = min(max(y, -746.0), 710.0)  # exp is 0 below, inf above
    n = np.floor(z * 1.4426950408889634 + 0.5)
    r = (z - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10
    p = 1.0 / 6227020800.0
    for c in (1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
              1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + c
    k = np.int64(n)
    h = k >> 1  # 2**n as 2**h · 2**(n - h): each half's exponent field (+ 1023 bias) stays normal
    e = p * _float64_from_bits((h + 1023) << 52) * _float64_from_bits((k - h + 1023) << 52)
    return e if y == y else y  # NaN stays NaN


@njit(inline="always", fastmath={"contract"})
def _exp_f32(y):
    """Within 2 ulp (tested; 1.2 by hand): degree 7 in float32, truncation r⁸/8! < 6e-9."""
    z = min(max(y, np.float32(-104.0)), np.float32(89.0))
    n = np.floor(z * np.float32(1.44269504) + np.float32(0.5))  # np.floor keeps float32; math.floor gives int64
    r = (z - n * np.float32(0.693359375)) + n * np.float32(2.12194440e-4)  # hi has 9 significant bits
    p = np.float32(1.0 / 5040.0)
    for c in (np.float32(1.0 / 720.0), np.float32(1.0 / 120.0), np.float32(1.0 / 24.0), np.float32(1.0 / 6.0),
              np.float32(0.5), np.float32(1.0), np.float32(1.0)):
        p = p * r + c
    k = np.int32(n)
    h = k >> 1
    e = p * _float32_from_bits(_U((h + 127) << 23)) * _float32_from_bits(_U((k - h + 127) << 23))
    return e if y == y else y


def _exp(y):
    """exp in y's own precision, for numba kernels only (the overload below picks the implementation)."""
    raise TypeError("sd3ref.kernels._exp runs inside numba kernels only")


@overload(_exp, inline="always")
def _exp_for(y):
    if y == types.float32:
        return lambda y: _exp_f32(y)
    return lambda y: _exp_f64(y)


@njit(inline="always")
def _half_to_single(h):
    """The float32 bits of the float16 bits h, exactly (all 65,536 patterns are tested): exponent rebiased by
    112, mantissa shifted by 13; inf/NaN get the all-ones exponent; a subnormal m·2⁻²⁴ is renormalised by
    computing (2⁻¹⁴ + m·2⁻²⁴) - 2⁻¹⁴ in float32, which is exact. Branch-free, so the loop vectorises."""
    o = (h & _U(0x7FFF)) << _U(13)
    e = o & _U(0x0F800000)
    o = o + _U(0x38000000)
    o = o + _U(0x38000000) if e == _U(0x0F800000) else o
    sub = _float32_from_bits(o + _U(0x00800000)) - _float32_from_bits(_U(0x38800000))
    o = _bits_from_float32(sub) if e == _U(0) else o
    return _float32_from_bits(o | ((h & _U(0x8000)) << _U(16)))


@njit(**_JIT)
def _half_to_float32(h, out):
    for i in prange(h.size):
        out[i] = _half_to_single(_U(h[i]))


@njit(**_JIT)
def _bfloat16_to_float32(h, out):
    for i in prange(h.size):
        out[i] = _float32_from_bits(_U(h[i]) << _U(16))  # bfloat16 is float32's upper half


PARALLEL_UPCAST = 1 << 16  # values: smaller 16-bit weights go to NumPy (a parallel launch is not worth it)


def upcast(w, dtype, out=None):
    """float16 or bfloat16 (``converters.tensors.BF16``, undecoded) → float32 on all cores, bit-exact: the
    per-use upcast of memory-mapped 16-bit weights, into ``out`` (a float32 array of w's size) when given.
    numba has no float16 type; NumPy's cast runs on one core at ~0.7 G values/s (13 ms for one 6144×1536
    MMDiT weight against 2.5 ms here) and its bfloat16 decode takes two passes (7.0-7.5 against 3.5-3.8 ms),
    by hand. Other dtype pairs, and weights under ``PARALLEL_UPCAST`` values, go to NumPy (``out`` unused)."""
    if not _upcast_here(w, dtype):
        return np.asarray(to_float32(w), dtype)
    out = np.empty(w.shape, np.float32) if out is None else out.reshape(w.shape)
    convert = _half_to_float32 if w.dtype == np.float16 else _bfloat16_to_float32
    convert(np.ascontiguousarray(w).reshape(-1).view(np.uint16), out.reshape(-1))
    return out


def _upcast_here(w, dtype):
    return (isinstance(w, np.ndarray) and w.dtype in (np.float16, BF16) and np.dtype(dtype) == np.float32
            and w.size >= PARALLEL_UPCAST)


SCRATCH_LIMIT = 128 << 20  # bytes: the largest per-thread buffer kept for weights upcast for one product
_scratch = threading.local()


def _upcast_for_product(w, dtype):
    """w in the compute dtype for one product. A 16-bit weight that ``upcast`` converts goes into a buffer this
    thread keeps (at most ``SCRATCH_LIMIT`` bytes; the largest MMDiT weight BLAS gets, SD3.5-large's MLP, is
    95 MB in float32): with glibc's default allocator (see ``sd3ref._reuse_freed_arrays``) a fresh float32
    array that size comes from a fresh mmap whose pages the kernel zero-fills on first touch (MMDiT from
    float16, one forward: 9.0 → 8.4 s at 256², 20.2-21.1 → 19.7 s at 512², by hand). The result is valid
    until this thread's next call."""
    if not _upcast_here(w, dtype) or w.size * 4 > SCRATCH_LIMIT:
        return upcast(w, dtype)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < w.size:
        buf = _scratch.buf = np.empty(w.size, np.float32)
    return upcast(w, dtype, out=buf[:w.size])


FEW_ROWS = 8  # products with at most this many rows read each weight row once, in numba


def _weight_row(w, n, buf):
    """Row n of w in buf's dtype (numba kernels only): float16 weights arrive as their uint16 bits and are
    converted into buf; other weights are returned in place (copying each row first made the product of 2
    rows and a 9216×1536 float32 weight 1.8× slower, by hand)."""
    raise TypeError("sd3ref.kernels._weight_row runs inside numba kernels only")


@overload(_weight_row, inline="always")
def _weight_row_for(w, n, buf):
    if w.dtype == types.uint16:
        def convert(w, n, buf):
            for k in range(buf.size):
                buf[k] = _half_to_single(_U(w[n, k]))
            return buf
        return convert
    return lambda w, n, buf: w[n]


@njit(**_JIT)
def _few_rows(x, w, out):
    """out[m, n] = Σ_k x[m, k]·w[n, k]: each weight row is read once and used for every row of x, float16
    rows converted (exactly) into a per-thread buffer first. ``w`` is float32 / float64, or float16 as
    uint16 bits."""
    M, K = x.shape
    N = w.shape[0]
    chunk = 64
    for c in prange((N + chunk - 1) // chunk):
        buf = np.empty(K, x.dtype)
        for n in range(c * chunk, min(N, (c + 1) * chunk)):
            row = _weight_row(w, n, buf)
            for m in range(M):
                xm = x[m]
                acc = x.dtype.type(0)
                for k in range(K):
                    acc += xm[k] * row[k]
                out[m, n] = acc


def matmul_t(x, w):
    """x (M, K) @ w.T for a torch-layout weight w (N, K) in its stored dtype. With 2 to ``FEW_ROWS`` rows (the
    MMDiT's adaLN modulations: one row per batch item), OpenBLAS runs a blocked product that reads the
    weight several times (3.8 ms for 2 rows and a 9216×1536 float32 weight, against 1.3-1.9 ms here); with
    a float16 weight, upcasting it whole first costs more than the product (8.3 against 2.1-2.9 ms). Those
    go to ``_few_rows``; the rest (one row against a float32 weight is a BLAS gemv) to BLAS, a float16
    weight upcast on all cores into a reused buffer first. All timings by hand."""
    few = x.shape[0] <= FEW_ROWS and (x.shape[0] >= 2 or w.dtype == np.float16)
    if few and w.dtype in (np.float16, np.float32, np.float64) and x.dtype in (np.float32, np.float64) \
            and np.result_type(w.dtype, x.dtype) == x.dtype:
        out = np.empty((x.shape[0], w.shape[0]), x.dtype)
        w = np.ascontiguousarray(w)
        _few_rows(np.ascontiguousarray(x), w.view(np.uint16) if w.dtype == np.float16 else w, out)
        return out
    return x @ _upcast_for_product(w, x.dtype).T


@njit(**_JIT)
def _norm_rows(x, mul, add, out, eps, per):
    """out[r] = (x[r] - mean)·rsqrt(var + eps)·mul[g] + add[g], g = r // per (LayerNorm).
    Statistics in float64; the centred second pass keeps float64 inputs exact to rounding."""
    n, d = x.shape
    for r in prange(n):
        g = r // per
        s = 0.0
        for j in range(d):
            s += x[r, j]
        mu = s / d
        v = 0.0
        for j in range(d):
            c = x[r, j] - mu
            v += c * c
        inv = 1.0 / math.sqrt(v / d + eps)
        for j in range(d):
            out[r, j] = (x[r, j] - mu) * inv * mul[g, j] + add[g, j]


def _rows(x):
    """x as contiguous (rows, last axis) — a view unless x is strided."""
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


def _table(a, x, fill):
    """A parameter that broadcasts against x (B, ..., D) as a (groups, D) table whose row r // (rows // groups)
    serves row r of x's rows: one group when it varies only over D, B groups for adaLN's (B, 1, D), one
    group per row (the parameter expanded) for any other broadcast pattern."""
    n = x.shape[-1]
    if a is None:
        return np.full((1, n), fill, x.dtype)
    a = np.asarray(a, x.dtype)
    lead = (1,) * (x.ndim - a.ndim) + a.shape[:-1]  # a's axes before D, aligned with x's
    varying = [i for i, s in enumerate(lead) if s != 1]
    if not varying or (varying == list(range(len(varying))) and lead[:len(varying)] == x.shape[:len(varying)]):
        return np.ascontiguousarray(a.reshape(-1, n))  # constant over x's trailing row axes: contiguous groups
    return np.ascontiguousarray(np.broadcast_to(a, x.shape).reshape(-1, n))


def _norm(x, mul, add, eps):
    if x.size == 0:
        return np.empty_like(x)
    xr = _rows(x)
    out = np.empty_like(xr)
    mul, add = _table(mul, x, 1.0), _table(add, x, 0.0)
    # group counts nest (1 | B | ... | rows): expand the coarser table to the finer one
    if mul.shape[0] < add.shape[0]:
        mul = np.repeat(mul, add.shape[0] // mul.shape[0], axis=0)
    elif add.shape[0] < mul.shape[0]:
        add = np.repeat(add, mul.shape[0] // add.shape[0], axis=0)
    _norm_rows(xr, mul, add, out, eps, max(1, xr.shape[0] // mul.shape[0]))
    return out.reshape(x.shape)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    return _norm(x, weight, bias, eps)


def layer_norm_modulate(x, shift, scale, eps):
    """x (B, L, D), shift and scale (B, 1, D)."""
    return _norm(x, 1.0 + np.asarray(scale, x.dtype), shift, eps)


@intrinsic
def _prefetch(typingctx, a, i):
    """A hint that a[i] (a contiguous 1-D array) will be read soon (llvm.prefetch: read, keep in all cache
    levels). No bounds check: a prefetch never faults."""
    if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        byte_ptr = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr] + [_I32] * 3),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(builder.gep(array.data, [args[1]]), byte_ptr), ir.Constant(_I32, 0),
                          ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return types.none(a, types.intp), codegen


def _compiled_width(d: int) -> int:
    """The row width ``_rms_heads`` is compiled for: attention-head widths (a multiple of 16 up to 256) gain
    from a compile-time width, long rows (T5's 4096: same speed, by hand) do not, and each width is a
    separate compile of ~1.2 s; 0 is the kernel that reads the width at run time."""
    return d if d % 16 == 0 and d <= 256 else 0


@functools.lru_cache(maxsize=None)
def _rms_heads(d):
    """The RMSNorm kernel for rows of ``d`` values, or of any width for ``d`` = 0 (numba caches each on disk):
    a row length known at compile time lets LLVM turn a 64-wide head row into whole vectors, with no remainder
    loop and no run-time trip-count or overlap checks per row (one thread on data in L2: 0.26 → 0.14 ns per
    value, by hand; into the joint array, cold, ``python -m bench.kernels`` times both: docs/performance.md).

    The kernel: out[b, i, h] = x[b, i, h]·rsqrt(mean(x[b, i, h]²) + eps)·w[h] for the rows of d values that
    start at b·xs[0] + i·xs[1] + h·xs[2] in the flat span x (likewise ``os`` in ``out``): the MMDiT's q/k heads
    are read where they lie inside the fused qkv projection and written where the joint attention reads
    them, with no contiguous copy either side. Flat 1-D spans, because numba vectorises their unit-stride
    row slices (a strided 3-D array was 5× slower, by hand).

    Each head row of the next token is prefetched while this token's is processed: in the fused projection
    a token's q and k are followed by its v, and at every such jump the hardware prefetcher stopped and
    restarted (2.4 against 1.5 ms on contiguous rows; with the prefetch 1.4-1.5 ms, by hand; a plain numba
    copy of the same rows ran at full speed without it).
    ``in_place`` (out is x, os is xs): the second pass reads and writes one view of out, because LLVM
    guards a loop that reads one array and writes another with a run-time overlap check, which an exact
    alias fails, so in place ran scalar code (5.1 against 2.7-2.9 ms, by hand)."""
    @njit(**_JIT)
    def rms_heads(x, xs, out, os, rows, w, eps, in_place):
        m, width = w.shape[0], d if d else w.shape[1]
        n = rows[0] * rows[1]
        line = max(1, 64 // x.itemsize)  # elements per 64-byte cache line
        for t in prange(n):  # per token, its heads inside: per head was 1.7× slower
            b, i = t // rows[1], t % rows[1]
            following = min(t + 1, n - 1)
            ahead = following // rows[1] * xs[0] + following % rows[1] * xs[1]
            for h in range(m):
                for u in range(0, width, line):
                    _prefetch(x, ahead + h * xs[2] + u)
                xo, oo = b * xs[0] + i * xs[1] + h * xs[2], b * os[0] + i * os[1] + h * os[2]
                row = x[xo:xo + width]  # slices: unit-stride, no wraparound checks
                v = 0.0
                for j in range(width):
                    v += row[j] * row[j]
                inv = 1.0 / math.sqrt(v / width + eps)
                orow = out[oo:oo + width]
                if in_place:  # the same row, read through out
                    for j in range(width):
                        orow[j] = orow[j] * inv * w[h, j]
                else:
                    for j in range(width):
                        orow[j] = row[j] * inv * w[h, j]
    return rms_heads


def _as4(a, shape):
    """a reshaped to ``shape`` (outer, rows, heads, d) without copying, with a unit-stride last axis and
    non-negative strides, or None when a's strides do not allow that."""
    try:
        a4 = np.reshape(a, shape, copy=False)
    except ValueError:
        return None
    if (a4.shape[3] > 1 and a4.strides[3] != a4.itemsize) or min(a4.strides) < 0 \
            or any(st % a4.itemsize for st in a4.strides):
        return None
    return a4


def _span(a4, writeable):
    """The contiguous 1-D run of memory from a4's first element to its last, and a4's first three strides in
    elements (0 along an axis of length 1)."""
    st = tuple(s // a4.itemsize if n > 1 else 0 for s, n in zip(a4.strides, a4.shape))
    size = 1 + sum((n - 1) * s for n, s in zip(a4.shape, st))
    flat = np.lib.stride_tricks.as_strided(a4, (size,), (a4.itemsize,), writeable=writeable)
    return flat, st[:3]


def rms_norm(x, weight=None, eps=1e-6, out=None):
    """One pass over strided views where they lie: the MMDiT normalises q and k together, straight from the
    fused qkv (one call on (B, L, 2, heads, hd) with a (2, 1, hd) weight: two calls were 2× slower, by hand),
    into the joint attention's [context; x] sequence (``out``, any strides; it may be x itself).
    ``weight`` broadcasts against x's trailing axes; the kernel sees x as (outer, rows, heads, last axis),
    ``heads`` spanning the weight's other axes (at least x's second-to-last)."""
    w = np.ones(x.shape[-1], x.dtype) if weight is None else np.asarray(weight, x.dtype)
    if np.broadcast_shapes(x.shape, w.shape) != x.shape:
        raise ValueError(f"rms_norm: a weight of shape {w.shape} would enlarge x of shape {x.shape}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or not out.flags.writeable):
        raise ValueError(f"rms_norm: out must be a writeable {x.dtype} array of shape {x.shape}")
    result = np.empty(x.shape, x.dtype) if out is None else out
    if x.size == 0:
        return result
    # trailing axes of x the weight table spans: short rows (the MMDiT's 64-wide heads) go per token, their
    # heads inside one work item (one item per head was 1.7× slower, by hand); long rows (T5's 4096) are items
    keep = max(w.ndim, 2 if x.shape[-1] < 256 else 1)
    lead = x.shape[:-keep] if x.ndim > keep else ()
    tail = ((1,) * keep + x.shape)[-keep:]
    m = int(np.prod(tail[:-1]))
    table = np.ascontiguousarray(np.broadcast_to(w, tail).reshape(m, tail[-1]))
    shape = (-1, lead[-1] if lead else 1, m, tail[-1])
    x4 = _as4(x, shape)
    if x4 is None:
        x4 = _as4(np.ascontiguousarray(x), shape)
    o4 = _as4(result, shape)
    in_place = o4 is not None and (x4.ctypes.data, x4.strides) == (o4.ctypes.data, o4.strides)
    if o4 is None or (np.may_share_memory(x4, o4) and not in_place):
        result[...] = rms_norm(x, weight, eps)  # an out the kernel cannot address, or a partial overlap
        return result
    (xf, xs), (of, os) = _span(x4, False), _span(o4, True)
    _rms_heads(_compiled_width(table.shape[1]))(xf, xs, of, os, x4.shape[:2], table, eps, in_place)
    return result


_CHUNKS = 64  # row chunks per image for the GroupNorm statistics: parallel work with contiguous rows


@njit(**_JIT)
def _channel_sums(x, centre, out):
    """out[b, k, c] = Σ (x[b, p, c] - centre[b, c]) over the k-th chunk of positions p (ᵖ power 1 or 2)."""
    b_, p_, c_ = x.shape
    k_ = out.shape[1] // 2
    for t in prange(b_ * k_):
        b, k = t // k_, t % k_
        for p in range(k * p_ // k_, (k + 1) * p_ // k_):
            for c in range(c_):
                d = x[b, p, c] - centre[b, c]
                out[b, k, c] += d
                out[b, k_ + k, c] += d * d


def _group_stats(x3, groups, eps):
    """Per (batch, group) mean and 1/std over (positions, channels of the group), in float64, from one read:
    sums of (x - s) and (x - s)² about a shift s taken from the data (the group's first value), so the
    variance Σ(x - s)²/n - (Σ(x - s)/n)² cancels only as much as (mean - s)² exceeds it. Where it exceeds
    it by more than the dtype can absorb (10³ for float64, 10⁷ for float32), a second read centred on the
    mean recomputes that batch's sums, as the two-pass form always did."""
    B, P, C = x3.shape
    cg = C // groups
    n = P * cg

    def reduce(sums):
        return (sums[:, :_CHUNKS].sum(1).reshape(B, groups, cg).sum(-1),
                sums[:, _CHUNKS:].sum(1).reshape(B, groups, cg).sum(-1))

    shift = np.repeat(x3[:, 0, ::cg], cg, axis=1)  # (B, C) in x's dtype, exact
    sums = np.zeros((B, 2 * _CHUNKS, C))
    _channel_sums(x3, np.ascontiguousarray(shift), sums)
    d, q = reduce(sums)
    s = shift[:, ::cg].astype(np.float64)
    mean = s + d / n
    var = (q - d * d / n) / n
    limit = 1e3 if x3.dtype.itemsize >= 8 else 1e7
    if np.any((d / n) ** 2 > limit * np.maximum(var, 0.0)):
        sums[:] = 0.0
        centre = np.repeat(mean, cg, axis=1).astype(x3.dtype)
        _channel_sums(x3, centre, sums)
        # Σ(x - m̃)² - (Σ(x - m̃))²/n corrects for m̃, the mean rounded to x's dtype.
        d, q = reduce(sums)
        mean = centre[:, ::cg].astype(np.float64) + d / n
        var = (q - d * d / n) / n
    return mean, 1.0 / np.sqrt(np.maximum(var, 0.0) + eps)


@njit(**_JIT)
def _channel_affine(x, m, a, d, out, silu):
    """out[b, p, c] = y = (x[b, p, c] - m[b, c])·a[b, c] + d[c], GroupNorm with its tables expanded per
    channel; y / (1 + exp(-y)) when ``silu``, in x's dtype. exp(-y) = inf for y ≪ 0 gives y / inf = -0,
    SiLU's limit."""
    b_, p_, c_ = x.shape
    one = x.dtype.type(1)
    for t in prange(b_ * p_):
        b, p = t // p_, t % p_
        if silu:
            for c in range(c_):
                y = (x[b, p, c] - m[b, c]) * a[b, c] + d[c]
                out[b, p, c] = y / (one + _exp(-y))
        else:
            for c in range(c_):
                out[b, p, c] = (x[b, p, c] - m[b, c]) * a[b, c] + d[c]


def _group_tables(x, groups, weight, bias, eps):
    B, H, W, C = x.shape
    x3 = np.ascontiguousarray(x).reshape(B, H * W, C)
    mean, inv = _group_stats(x3, groups, eps)
    cg = C // groups
    a = np.repeat(inv, cg, axis=1) * np.asarray(weight, np.float64)  # (B, C): 1/std·weight, in float64
    return x3, np.repeat(mean, cg, axis=1).astype(x.dtype), a.astype(x.dtype), np.asarray(bias, x.dtype)


def _output(x, out):
    """Where an elementwise kernel writes: a fresh array, or ``out`` (which may be x: each element is read
    before it is written)."""
    if out is None:
        return np.empty(x.shape, x.dtype)  # C order whatever x's: the kernels write through a C-order reshape
    if out.shape != x.shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {x.dtype} array of shape {x.shape}")
    return out


def _group_norm(x, groups, weight, bias, eps, silu, out=None):
    """Two reads of x, the minimum for a norm whose statistics span the whole image: the statistics, then
    one pass that normalises (and applies SiLU) into the output."""
    out = _output(x, out)
    if x.size == 0:
        return out
    x3, m, a, d = _group_tables(x, groups, weight, bias, eps)
    _channel_affine(x3, m, a, d, out.reshape(x3.shape), silu)
    return out


def group_norm(x, groups, weight, bias, eps=1e-6):
    return _group_norm(x, groups, weight, bias, eps, False)


def group_norm_silu(x, groups, weight, bias, eps=1e-6, out=None):
    return _group_norm(x, groups, weight, bias, eps, True, out)


@njit(**_JIT)
def _gelu(x, out):
    """0.5·x·(1 + tanh(u)) written as x / (1 + exp(-2u)), the same function without tanh's cancellation
    near -1; u = √(2/π)·(x + 0.044715·x³). Constants in x's dtype: float32 stays float32 (a Python float
    would promote the whole expression to float64)."""
    c, a, one = x.dtype.type(-2.0 * math.sqrt(2.0 / math.pi)), x.dtype.type(0.044715), x.dtype.type(1)
    for i in prange(x.size):
        v = x[i]
        out[i] = v / (one + _exp(c * (v + a * v * v * v)))


def gelu_tanh(x, out=None):
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):  # what the plain form gives: integers → float64, float16 kept
        y = gelu_tanh(x.astype(np.float32 if x.dtype == np.float16 else np.result_type(x.dtype, 0.5)))
        if out is None:
            return y.astype(np.result_type(x.dtype, 0.5))
        out[...] = y  # as the plain form's ``out``: NumPy's casting
        return out
    xc = np.require(x, requirements="C")  # keeps 0-d arrays 0-d, unlike np.ascontiguousarray
    out = _output(xc, out)
    _gelu(xc.reshape(-1), out.reshape(-1))
    return out


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _softmax_numerators(s, scale, inv):
    """s[r] ← exp(s[r]·scale - max), inv[r] ← 1 / Σ, for scale > 0: the softmax without its division, which
    the caller applies to the (rows, head dim) product instead of the (rows, keys) logits. Serial and
    GIL-free: the attention runs one per thread. The row maximum is kept in 16 lanes (a float max reduction
    does not vectorise while it must honour NaN; it need not here: a NaN anywhere in the row reaches the
    sum). The sum is in s's dtype, 16 partial sums. A row with a NaN, or all -inf (fully masked), gives
    NaN, as NumPy does."""
    n, m = s.shape
    lanes = np.empty(16, s.dtype)
    for r in range(n):
        lanes[:] = s[r, 0]
        for j in range(0, m - 15, 16):
            for u in range(16):
                v = s[r, j + u]
                lanes[u] = v if v > lanes[u] else lanes[u]
        for j in range(m - m % 16, m):
            lanes[0] = s[r, j] if s[r, j] > lanes[0] else lanes[0]
        mx = lanes[0]
        for u in range(1, 16):
            mx = lanes[u] if lanes[u] > mx else mx
        mx *= scale
        t = s.dtype.type(0)
        for j in range(m):
            e = _exp(s[r, j] * scale - mx)
            s[r, j] = e
            t += e
        inv[r] = s.dtype.type(1) / t


_POOL = None  # the attention's worker threads, created on first use
_BLAS = None  # threadpoolctl's view of the BLAS libraries


def _workers():
    """The attention's thread pool: as many threads as numba may use (``threads()`` never exceeds it)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(numba.config.NUMBA_NUM_THREADS, thread_name_prefix="sd3ref-attention")
    return _POOL


def _blas_single_threaded():
    """A context in which BLAS runs in the calling thread only."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def attention(q, k, v, scale, mask=None, budget=None):
    """Scaled dot-product attention on (B, heads, L, hd) arrays of any strides: each head is a strided 2-D view
    that BLAS reads in place (the (B, L, heads, hd) views every caller makes from its projections need no
    copy). The result is a (B, heads, Lq, hd) view of a (B, Lq, heads, hd) array, so merging the heads back
    into (B, Lq, heads·hd) is free.

    The (head, query block) pairs are shared out among ``threads()`` Python threads, each running
    single-threaded BLAS on blocks of at most ``budget`` bytes of logits (default ``ATTENTION_BUDGET`` per
    thread): extra memory O(threads × block × Lk), never the full Lq × Lk. A (block, Lk) product with K = head
    dim is too small for OpenBLAS to split well over threads (106 GFLOP/s on 2 cores at 512×512, against 120
    per core for one head per thread, by hand). With fewer heads than threads (the VAE's single head) the
    query blocks are shared instead."""
    q, k, v = (a if a.strides[-1] == a.itemsize else np.ascontiguousarray(a) for a in (q, k, v))
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    out = np.empty((B, Lq, H, v.shape[-1]), q.dtype)
    block = max(1, min(Lq, (budget or ATTENTION_BUDGET) // (Lk * q.dtype.itemsize)))
    fused = mask is None and scale > 0  # the numerators take the row max before scaling
    m4 = None if mask is None else np.broadcast_to(np.asarray(mask, q.dtype), (B, H, Lq, Lk))
    heads = [(b, h) for b in range(B) for h in range(H)]
    starts = range(0, Lq, block)
    if len(heads) >= threads():  # whole heads per thread: balanced, each head's keys read by one thread
        shares = [[(b, h, i) for i in starts] for b, h in heads]
    else:  # fewer heads than threads (the VAE's single head): the query blocks are shared
        shares = [[(b, h, i)] for b, h in heads for i in starts]
    step = max(1, min(threads(), len(shares)))
    one, scaled = q.dtype.type(1), q.dtype.type(scale)

    def blocks(first):
        s, inv = np.empty((block, Lk), q.dtype), np.empty(block, q.dtype)
        for b, h, i in (item for share in shares[first::step] for item in share):
            j = min(i + block, Lq)
            sb = s[:j - i]
            np.matmul(q[b, h, i:j], k[b, h].T, out=sb)
            if fused:
                _softmax_numerators(sb, scaled, inv)
            else:  # the plain order: logits·scale + mask, then softmax
                sb *= scale
                if m4 is not None:
                    sb += m4[b, h, i:j]
                _softmax_numerators(sb, one, inv)
            ob = out[b, i:j, h]
            np.matmul(sb, v[b, h], out=ob)
            ob *= inv[:j - i, None]

    if step == 1:
        blocks(0)
    else:
        with _blas_single_threaded():
            for f in [_workers().submit(blocks, t) for t in range(step)]:
                f.result()
    return out.transpose(0, 2, 1, 3)


def threads() -> int:
    """numba's thread count (``NUMBA_NUM_THREADS``)."""
    return numba.get_num_threads()


CONV_BUDGET = 16 << 20  # bytes of im2col patches per block of output rows


@njit(**_JIT)
def _im2col(x, n, r0, stride, up, top, left, cols):
    """cols[p, q, i, j, :] = X[(r0 + p)·stride + i - top, q·stride + j - left, :] for X the image ``n`` of x
    upsampled ``up``× (nearest), zero outside it: padding and upsampling are read in place, never copied."""
    _, H, W, C = x.shape
    m, Wo, kh, kw, _ = cols.shape
    for t in prange(m * Wo):
        p, q = t // Wo, t % Wo
        for i in range(kh):
            h = (r0 + p) * stride + i - top
            for j in range(kw):
                w = q * stride + j - left
                if 0 <= h < H * up and 0 <= w < W * up:
                    hs, ws = h // up, w // up
                    for c in range(C):
                        cols[p, q, i, j, c] = x[n, hs, ws, c]
                else:
                    for c in range(C):
                        cols[p, q, i, j, c] = 0


def conv2d(x, w, b=None, stride=1, padding=0, upsample=1, budget=None):
    """im2col in blocks of output rows (numba, padding and upsampling read in place), one BLAS product per
    block with K = kh·kw·I (the plain form's per-tap products have K = I and run as stacks of small
    matrices), the bias added to each block while it is in cache."""
    from .nn import pads  # nn imports this module when the fast paths are switched on

    x = np.ascontiguousarray(x)
    w = upcast(w, x.dtype)
    O, I, kh, kw = w.shape
    B, H, W, _ = x.shape
    (top, bottom), (left, right) = pads(padding)
    if x.shape[3] != I:
        raise ValueError(f"conv2d: input has {x.shape[3]} channels, the weight expects {I}")
    if min(top, bottom, left, right) < 0 or upsample < 1 or stride < 1:
        raise ValueError(f"conv2d: padding {padding}, stride {stride} and upsample {upsample} must be ≥ 0, ≥ 1, ≥ 1")
    Ho = (H * upsample + top + bottom - kh) // stride + 1
    Wo = (W * upsample + left + right - kw) // stride + 1
    if Ho <= 0 or Wo <= 0 or I * kh * kw == 0:  # nothing to gather: the plain form's zeros (+ bias)
        y = np.zeros((B, max(Ho, 0), max(Wo, 0), O), x.dtype)
        return y if b is None else y + np.asarray(b, x.dtype)
    wt = w.transpose(2, 3, 1, 0).reshape(kh * kw * I, O)  # (K, O), K ordered (i, j, channel) as the patches
    bias = None if b is None else np.asarray(b, x.dtype)
    y = np.empty((B, Ho, Wo, O), x.dtype)
    rows = max(1, min(Ho, (budget or CONV_BUDGET) // (Wo * kh * kw * I * x.dtype.itemsize)))
    cols = np.empty((rows, Wo, kh, kw, I), x.dtype)
    for n in range(B):
        for r in range(0, Ho, rows):
            m = min(rows, Ho - r)
            _im2col(x, n, r, stride, upsample, top, left, cols[:m])
            yb = y[n, r:r + m].reshape(m * Wo, O)
            np.matmul(cols[:m].reshape(m * Wo, -1), wt, out=yb)
            if bias is not None:
                yb += bias
    return y
