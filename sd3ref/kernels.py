"""numba / blocked-BLAS fast paths for the primitives that dominate CPU time. Each function here has a
plain-NumPy twin of the same name in ``nn`` (the oracle); ``nn.use_kernels`` is the one switch that routes
``nn`` calls here, and tests/test_kernels.py checks twin against twin in float32 and float64.

Why they are faster: a NumPy expression such as LayerNorm + modulate makes ~8 passes over a (B, L, D)
array, each allocating a temporary; the numba kernels make one or two, in parallel over rows. Attention
never materialises more than ``ATTENTION_BUDGET`` bytes of logits: queries are processed in blocks, each
block's full row of keys at once (so no online softmax is needed), with both products in BLAS.

numba has no vector math library here (no SVML), so a scalar ``math.exp`` / ``math.tanh`` in a loop is
several times slower than NumPy's SIMD ufuncs: GELU and SiLU leave tanh / exp to NumPy and fuse the
rest; the softmax inlines its own exp (``_exp_nonpositive``) to stay one launch with rows in cache.

Threads: numba's prange uses ``NUMBA_NUM_THREADS`` (default: all cores), OpenBLAS uses
``OPENBLAS_NUM_THREADS`` (default: all cores). They never run at the same time (no kernel calls BLAS), so
the defaults do not oversubscribe; to share a machine, set both variables to the same smaller count.
numba's threading layer is "workqueue" unless ``NUMBA_THREADING_LAYER`` says otherwise: the OpenMP layer's
spinning workers fight OpenBLAS's for the cores: a LayerNorm of a 666×1536 array took 7-12 ms instead of
0.4 ms on 2 cores (measured once by hand, docs/performance.md). workqueue does not allow kernels to be
launched from two Python threads at once.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
from numba import njit, prange

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# Reassociation lets LLVM vectorise the reductions; contraction allows FMA. No nnan/ninf: masks use -inf.
_JIT = dict(cache=True, parallel=True, fastmath={"reassoc", "contract"}, nogil=True)

ATTENTION_BUDGET = 8 << 20  # bytes of logits per block: small enough to stay in L2/L3 between passes


_POW2 = np.ldexp(1.0, np.arange(-1100, 1))  # 2**n for the exponent of every float64 exp(y ≤ 0) that is not 0


@njit(inline="always", fastmath={"contract"})
def _exp_nonpositive(y):
    """exp(y) for y ≤ 0 in float64 arithmetic, made of operations LLVM can inline into the calling
    loop (numba's math.exp is an opaque libm call): y = n·ln2 + r, |r| ≤ ln2/2, a degree-11 Taylor
    polynomial (truncation < 2e-16) times 2**n from a table."""
    y = max(y, -745.5)  # below, exp underflows to 0 (the table's 2**-1075 is 0)
    n = math.floor(y * 1.4426950408889634 + 0.5)
    r = (y - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10  # ln2 split hi + lo
    p = 1.0 / 39916800.0
    for c in (1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
              1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + c
    return p * _POW2[int(n) + 1100]


@njit(**_JIT)
def _norm_rows(x, mul, add, out, eps, centre, per):
    """out[r] = (x[r] - mean)·rsqrt(var + eps)·mul[g] + add[g], g = r // per; RMS (mean = 0) unless ``centre``.
    Statistics in float64; the centred second pass keeps float64 inputs exact to rounding."""
    n, d = x.shape
    for r in prange(n):
        g = r // per
        mu = 0.0
        if centre:
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


def _vec(a, like, n, fill):
    """A (groups, D) parameter table in ``like``'s dtype (``fill`` where the layer has no such parameter)."""
    if a is None:
        return np.full((1, n), fill, like.dtype)
    return np.ascontiguousarray(np.asarray(a, like.dtype).reshape(-1, n))


def _norm(x, mul, add, eps, centre):
    xr = _rows(x)
    out = np.empty_like(xr)
    mul, add = _vec(mul, x, xr.shape[1], 1.0), _vec(add, x, xr.shape[1], 0.0)
    _norm_rows(xr, mul, add, out, eps, centre, max(1, xr.shape[0] // mul.shape[0]))
    return out.reshape(x.shape)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    return _norm(x, weight, bias, eps, True)


def layer_norm_modulate(x, shift, scale, eps):
    """x (B, L, D), shift and scale (B, 1, D)."""
    return _norm(x, 1.0 + np.asarray(scale, x.dtype), shift, eps, True)


@njit(**_JIT)
def _rms_heads(flat, s0, s1, n, m, w, out, eps):
    """out[i, h] = x[i, h]·rsqrt(mean(x[i, h]²) + eps)·w for x[i, h, j] = flat[i·s0 + h·s1 + j]: the q/k heads
    are read where they lie inside the fused qkv projection, with no contiguous copy first. ``flat`` is a
    contiguous 1-D span (numba vectorises its unit-stride rows; a strided 3-D array measured 5× slower)."""
    d = w.shape[0]
    for t in prange(n * m):
        i, h = t // m, t % m
        row = flat[i * s0 + h * s1:i * s0 + h * s1 + d]  # a slice: unit-stride, no wraparound checks
        v = 0.0
        for j in range(d):
            v += row[j] * row[j]
        inv = 1.0 / math.sqrt(v / d + eps)
        for j in range(d):
            out[i, h, j] = row[j] * inv * w[j]


def _as3(x):
    """x as a (rows, heads, last axis) view with a unit-stride last axis and non-negative strides, without
    copying, or None when its strides do not allow one."""
    if x.ndim < 2 or x.size == 0:
        return None
    try:
        x3 = np.reshape(x, (-1,) + x.shape[-2:], copy=False)
    except ValueError:
        return None
    if (x3.shape[2] > 1 and x3.strides[2] != x3.itemsize) or min(x3.strides) < 0 \
            or any(st % x3.itemsize for st in x3.strides):
        return None
    return x3


def _span(x3):
    """The contiguous 1-D run of memory from x3's first element to its last (a read-only view)."""
    st = [s // x3.itemsize if n > 1 else 0 for s, n in zip(x3.strides, x3.shape)]
    size = 1 + sum((n - 1) * s for n, s in zip(x3.shape, st))
    flat = np.lib.stride_tricks.as_strided(x3, (size,), (x3.itemsize,), writeable=False)
    return flat, st[0], st[1]


def rms_norm(x, weight=None, eps=1e-6):
    """One pass that reads strided views (mmdit's q/k heads inside the fused qkv) where they are."""
    x3 = _as3(x)
    if x3 is None:
        return _norm(x, weight, None, eps, False)
    d = x.shape[-1]
    w = np.ones(d, x.dtype) if weight is None else np.ascontiguousarray(np.asarray(weight, x.dtype).reshape(d))
    out = np.empty(x3.shape, x.dtype)
    flat, s0, s1 = _span(x3)
    _rms_heads(flat, s0, s1, x3.shape[0], x3.shape[1], w, out, eps)
    return out.reshape(x.shape)


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
def _channel_affine(x, m, a, d, out, sign):
    """out[b, p, c] = sign·((x[b, p, c] - m[b, c])·a[b, c] + d[c]): GroupNorm with its tables expanded per
    channel (sign -1 gives the argument of SiLU's exp)."""
    b_, p_, c_ = x.shape
    for t in prange(b_ * p_):
        b, p = t // p_, t % p_
        for c in range(c_):
            out[b, p, c] = sign * ((x[b, p, c] - m[b, c]) * a[b, c] + d[c])


@njit(**_JIT)
def _channel_affine_silu(x, m, a, d, e):
    """e[b, p, c] ← y / (1 + e[b, p, c]) with y the GroupNorm output recomputed from x and e = exp(-y)."""
    b_, p_, c_ = x.shape
    for t in prange(b_ * p_):
        b, p = t // p_, t % p_
        for c in range(c_):
            e[b, p, c] = ((x[b, p, c] - m[b, c]) * a[b, c] + d[c]) / (1.0 + e[b, p, c])


def _group_tables(x, groups, weight, bias, eps):
    B, H, W, C = x.shape
    x3 = np.ascontiguousarray(x).reshape(B, H * W, C)
    mean, inv = _group_stats(x3, groups, eps)
    cg = C // groups
    a = np.repeat(inv, cg, axis=1) * np.asarray(weight, np.float64)  # (B, C): 1/std·weight, in float64
    return x3, np.repeat(mean, cg, axis=1).astype(x.dtype), a.astype(x.dtype), np.asarray(bias, x.dtype)


def group_norm(x, groups, weight, bias, eps=1e-6):
    x3, m, a, d = _group_tables(x, groups, weight, bias, eps)
    out = np.empty_like(x3)
    _channel_affine(x3, m, a, d, out, 1.0)
    return out.reshape(x.shape)


_POOL = None  # threads for NumPy's single-threaded SIMD exp on large arrays (created on first use)


def _exp_inplace(a):
    """a ← exp(a) for a contiguous array, split over ``threads()`` Python threads (NumPy releases the GIL in
    ufunc loops; no numba kernel runs meanwhile): 10.7 → 5.9 ms for 134 MB on 2 cores."""
    global _POOL
    flat, k = a.reshape(-1), threads()
    if k < 2 or flat.size < 1 << 20:
        np.exp(flat, out=flat)
        return
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(k, thread_name_prefix="sd3ref-exp")
    step = -(-flat.size // k)
    parts = [flat[i:i + step] for i in range(0, flat.size, step)]
    for f in [_POOL.submit(np.exp, p, out=p) for p in parts]:
        f.result()


def group_norm_silu(x, groups, weight, bias, eps=1e-6):
    """Statistics (one read), -y into the output buffer, NumPy's SIMD exp in place, then y recomputed from x
    and y / (1 + exp(-y)) written over it: one output array, no temporaries (an inlined exp measured slower)."""
    x3, m, a, d = _group_tables(x, groups, weight, bias, eps)
    out = np.empty_like(x3)
    _channel_affine(x3, m, a, d, out, -1.0)
    with np.errstate(over="ignore"):  # exp(-y) = inf for y < -88 (float32): y / inf = -0, as silu's limit
        _exp_inplace(out)
    _channel_affine_silu(x3, m, a, d, out)
    return out.reshape(x.shape)


@njit(**_JIT)
def _gelu_inner(x, u):
    c = math.sqrt(2.0 / math.pi)
    for i in prange(x.size):
        v = x.flat[i]
        u.flat[i] = c * (v + 0.044715 * v * v * v)


@njit(**_JIT)
def _gelu_outer(x, t):
    for i in prange(x.size):
        t.flat[i] = 0.5 * x.flat[i] * (1.0 + t.flat[i])


def gelu_tanh(x):
    """Three passes (polynomial, NumPy's SIMD tanh, product) instead of the plain form's eight. One pass
    with tanh from ``_exp_nonpositive`` measured slower by hand (25 ms against 11 ms at 2×1357×6144)."""
    x = np.ascontiguousarray(x)
    t = np.empty_like(x)
    _gelu_inner(x.reshape(-1), t.reshape(-1))
    np.tanh(t, out=t)
    _gelu_outer(x.reshape(-1), t.reshape(-1))
    return t


@njit(**_JIT)
def softmax_rows(s, scale=1.0):
    """In-place softmax(s·scale) over the rows of a 2-D array: max, exp and sum, scale — one launch, rows
    in cache. A fully masked row (all -inf) gives NaN, as the plain form does."""
    n, m = s.shape
    for r in prange(n):
        mx = -np.inf
        for j in range(m):
            mx = max(mx, s[r, j] * scale)
        t = 0.0
        for j in range(m):
            e = _exp_nonpositive(s[r, j] * scale - mx)
            s[r, j] = e
            t += e
        for j in range(m):
            s[r, j] /= t


def attention(q, k, v, scale, mask=None, budget=None):
    """Scaled dot-product attention on (B, heads, L, hd) in query blocks of at most ``budget`` bytes of
    logits (default ``ATTENTION_BUDGET``): extra memory O(block × Lk), never the full Lq × Lk."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    q3, k3, v3 = (np.ascontiguousarray(a).reshape(B * H, a.shape[2], a.shape[3]) for a in (q, k, v))
    out = np.empty((B * H, Lq, v.shape[-1]), q.dtype)
    block = max(1, min(Lq, (budget or ATTENTION_BUDGET) // (Lk * q.dtype.itemsize)))
    s = np.empty((block, Lk), q.dtype)
    m4 = None if mask is None else np.broadcast_to(np.asarray(mask, q.dtype), (B, H, Lq, Lk))
    for bh in range(B * H):
        kt = k3[bh].T
        for i in range(0, Lq, block):
            j = min(i + block, Lq)
            sb = s[:j - i]
            np.matmul(q3[bh, i:j], kt, out=sb)
            if m4 is None:
                softmax_rows(sb, scale)
            else:  # the plain order: logits·scale + mask, then softmax
                sb *= scale
                sb += m4[bh // H, bh % H, i:j]
                softmax_rows(sb)
            np.matmul(sb, v3[bh], out=out[bh, i:j])
    return out.reshape(B, H, Lq, v.shape[-1])


def threads() -> int:
    """numba's thread count (``NUMBA_NUM_THREADS``)."""
    return numba.get_num_threads()


CONV_BUDGET = 16 << 20  # bytes of im2col patches per block of output rows


def conv2d(x, w, b=None, stride=1, padding=0, budget=None):
    """im2col in blocks of output rows, one BLAS product per block with K = kh·kw·I (the plain form's
    per-tap products have K = I and run as stacks of small matrices)."""
    from .nn import conv_input  # nn imports this module when the fast paths are switched on

    x, w, Ho, Wo = conv_input(x, w, stride, padding)
    O, I, kh, kw = w.shape
    B = x.shape[0]
    wm = w.transpose(0, 2, 3, 1).reshape(O, kh * kw * I)  # patch features ordered (i, j, channel)
    y = np.empty((B, Ho, Wo, O), x.dtype)
    rows = max(1, min(Ho, (budget or CONV_BUDGET) // (Wo * kh * kw * I * x.dtype.itemsize)))
    cols = np.empty((rows, Wo, kh, kw, I), x.dtype)
    for n in range(B):
        for r in range(0, Ho, rows):
            m = min(rows, Ho - r)
            for i in range(kh):
                for j in range(kw):
                    top = r * stride + i
                    cols[:m, :, i, j] = x[n, top:top + stride * (m - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride]
            np.matmul(cols[:m].reshape(m * Wo, -1), wm.T, out=y[n, r:r + m].reshape(m * Wo, O))
    if b is not None:
        y += np.asarray(b, x.dtype)
    return y
