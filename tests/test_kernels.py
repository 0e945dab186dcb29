"""The numba / blocked fast paths (sd3ref.kernels) against their plain-NumPy twins (sd3ref.nn), on random
inputs of awkward sizes, float32 and float64."""

import os
import platform
import subprocess
import sys

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converters.tensors import BF16, to_float32
from sd3ref import kernels, nn, verify

DTYPES = [np.float32, np.float64]
# Relative to the largest output magnitude. Twin against twin: two computations of one formula in different
# orders (and exp by different code), each within verify's 1e-5 / 1e-10 of the exact result in float32 /
# float64, so at most twice that apart; float64's 1e-12 is tighter because these ops are short.
TOL = {np.float32: 2e-5, np.float64: 1e-12}
dims = st.integers(1, 37)
seeds = st.integers(0, 2**32 - 1)
SETTINGS = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def plain():
    """Run the body with the plain NumPy functions, whatever the default is."""
    saved = nn._kernels
    nn.use_kernels(False)
    yield
    nn._kernels = saved


def close(fast, ref, dtype):
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == dtype
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    np.testing.assert_allclose(fast, ref, rtol=0, atol=TOL[dtype] * scale, equal_nan=True)


def exact(plain, x, *args):
    """The plain twin run in float64 on x's values, rounded to x's dtype. For the norms, whose fast paths keep
    their statistics in float64: the float32 oracle itself loses up to ~3e-5 on rows whose spread is tiny
    against their mean (cancellation in x - mean; hypothesis found a two-value row), the fast path does not."""
    up = [np.asarray(a, np.float64) if isinstance(a, np.ndarray) else a for a in (x, *args)]
    return plain(*up).astype(x.dtype)


def rand(rng, shape, dtype, spread=3.0):
    return (rng.standard_normal(shape) * spread + rng.standard_normal()).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(b=st.integers(1, 3), l=dims, d=dims, affine=st.booleans(), seed=seeds)
def test_layer_norm(dtype, b, l, d, affine, seed):
    rng = np.random.default_rng(seed)
    x, w, bias = rand(rng, (b, l, d), dtype), rand(rng, d, np.float16), rand(rng, d, dtype)
    args = (w, bias) if affine else (None, None)
    close(kernels.layer_norm(x, *args, 1e-5), exact(nn.layer_norm, x, *args, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(b=st.integers(1, 3), l=dims, d=dims, seed=seeds)
def test_layer_norm_modulate(dtype, b, l, d, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, (b, l, d), dtype)
    mod = rand(rng, (b, 1, 2 * d), dtype, 1.0)
    shift, scale = np.split(mod, 2, axis=-1)  # strided views, as mmdit passes them
    close(kernels.layer_norm_modulate(x, shift, scale, 1e-6), exact(nn.layer_norm_modulate, x, shift, scale, 1e-6),
          dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(b=st.integers(1, 3), l=dims, h=st.integers(1, 4), d=dims, seed=seeds)
def test_rms_norm_on_strided_heads(dtype, b, l, h, d, seed):
    # views into a fused qkv: k alone (strided heads), and q and k together as mmdit calls it
    # ((B, L, 2, heads, hd), one weight row each)
    rng = np.random.default_rng(seed)
    qkv = rand(rng, (b, l, 3, h, d), dtype)
    wk = rand(rng, d, dtype)
    close(kernels.rms_norm(qkv[:, :, 1], wk, 1e-6), nn.rms_norm(qkv[:, :, 1], wk, 1e-6), dtype)
    w = rand(rng, (2, 1, d), np.float16)
    fast, ref = kernels.rms_norm(qkv[:, :, :2], w, 1e-6), nn.rms_norm(qkv[:, :, :2], w, 1e-6)
    close(fast, ref, dtype)
    close(fast[:, :, 1], nn.rms_norm(qkv[:, :, 1], w[1], 1e-6), dtype)  # = k normalised alone
    # one weight row for both: (B, L, 2) rows of (heads, hd)
    close(kernels.rms_norm(qkv[:, :, :2], w[0, 0], 1e-6), nn.rms_norm(qkv[:, :, :2], w[0, 0], 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(b=st.integers(1, 3), lc=dims, l=dims, h=st.integers(1, 4), d=dims, seed=seeds)
def test_rms_norm_into_a_view(dtype, b, lc, l, h, d, seed):
    # as mmdit calls it: q and k of one stream into its rows of the joint (B, Lc + L, 3, heads, hd) sequence;
    # in place; into a view that overlaps x partly (k's rows are q's output: the kernel must not read them
    # after writing); into an array whose strides the kernel cannot address (transposed)
    rng = np.random.default_rng(seed)
    qkv = rand(rng, (b, l, 3, h, d), dtype)
    w = rand(rng, (2, 1, d), dtype)
    ref = nn.rms_norm(qkv[:, :, :2], w, 1e-6)
    joint = np.full((b, lc + l, 3, h, d), 7.0, dtype)
    got = kernels.rms_norm(qkv[:, :, :2], w, 1e-6, out=joint[:, lc:, :2])
    assert got.base is not None and np.shares_memory(got, joint)
    close(joint[:, lc:, :2], ref, dtype)
    assert (joint[:, :lc] == 7).all() and (joint[:, lc:, 2] == 7).all()  # nothing else written
    own = qkv.copy()
    kernels.rms_norm(own[:, :, :2], w, 1e-6, out=own[:, :, :2])
    close(own[:, :, :2], ref, dtype)
    np.testing.assert_array_equal(own[:, :, 2], qkv[:, :, 2])
    own = qkv.copy()
    kernels.rms_norm(own[:, :, :2], w, 1e-6, out=own[:, :, 1:])
    close(own[:, :, 1:], ref, dtype)
    x = rand(rng, (l, h, d), dtype)
    out = np.empty((d, h, l), dtype).T
    kernels.rms_norm(x, w[0, 0], 1e-6, out=out)
    close(out, nn.rms_norm(x, w[0, 0], 1e-6), dtype)
    with pytest.raises(ValueError, match="out must be"):
        kernels.rms_norm(x, w[0, 0], 1e-6, out=np.empty((l, h, d + 1), dtype))
    with pytest.raises(ValueError, match="writeable"):
        kernels.rms_norm(x, w[0, 0], 1e-6, out=np.broadcast_to(np.empty(d, dtype), x.shape))


def test_rms_norm_weight_must_not_enlarge_x():
    with pytest.raises(ValueError, match="enlarge"):
        kernels.rms_norm(np.ones((3, 4)), np.ones((2, 3, 4)))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(l=dims, h=st.integers(1, 4), d=dims, weighted=st.booleans(), seed=seeds)
def test_rms_norm_on_other_layouts(dtype, l, h, d, weighted, seed):
    # contiguous, a transposed (non-viewable: the copying fallback) and a 1-D input; with and without weight
    rng = np.random.default_rng(seed)
    x, w = rand(rng, (l, h, d), dtype), rand(rng, d, dtype) if weighted else None
    for a in (x, x.transpose(1, 0, 2), x[0, 0]):
        close(kernels.rms_norm(a, w, 1e-6), nn.rms_norm(a, w, 1e-6), dtype)
    long_rows, w = rand(rng, (l, h, 256 + d), dtype), rand(rng, 256 + d, dtype)  # T5's rows: one row per work item
    for a in (long_rows, long_rows[:, ::-1], long_rows[0]):
        close(kernels.rms_norm(a, w, 1e-6), nn.rms_norm(a, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(b=st.integers(1, 2), h=dims, w=dims, groups=st.integers(1, 4), cg=st.integers(1, 5),
       offset=st.sampled_from([0.0, 1e3]), seed=seeds)
def test_group_norm_and_silu(dtype, b, h, w, groups, cg, offset, seed):
    rng = np.random.default_rng(seed)
    c = groups * cg
    x, gw, gb = rand(rng, (b, h, w, c), dtype), rand(rng, c, dtype), rand(rng, c, dtype)
    if dtype is np.float64:
        # an outlier at the first position, where the one-read statistics take their shift (float64 only: the
        # float32 oracle itself loses 2e-5 there)
        x[:, 0, 0] += offset
    close(kernels.group_norm(x, groups, gw, gb, 1e-6), nn.group_norm(x, groups, gw, gb, 1e-6), dtype)
    ref = nn.group_norm_silu(x, groups, gw, gb, 1e-6)
    close(kernels.group_norm_silu(x, groups, gw, gb, 1e-6), ref, dtype)
    y = x.copy()  # in place, as the VAE calls it on an activation it owns
    assert kernels.group_norm_silu(y, groups, gw, gb, 1e-6, out=y) is y
    close(y, ref, dtype)


def test_group_norm_second_read(monkeypatch):
    # (shift - mean)² > 10³·var, possible only with > 10³ values per group: the centred second read runs
    rng = np.random.default_rng(0)
    x, gw, gb = rand(rng, (1, 40, 40, 2), np.float64), rand(rng, 2, np.float64), rand(rng, 2, np.float64)
    x[:, 0, 0] += 1e4
    calls = []
    sums = kernels._channel_sums
    monkeypatch.setattr(kernels, "_channel_sums", lambda *a: calls.append(1) or sums(*a))
    close(kernels.group_norm_silu(x, 2, gw, gb, 1e-6), nn.group_norm_silu(x, 2, gw, gb, 1e-6), np.float64)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), seed=seeds)
def test_gelu_tanh(dtype, shape, seed):
    x = rand(np.random.default_rng(seed), shape, dtype, 4.0)
    ref = nn.gelu_tanh(x)
    close(kernels.gelu_tanh(x), ref, dtype)
    y, plain = x.copy(), x.copy()  # in place, as the MMDiT's MLP calls it
    assert kernels.gelu_tanh(y, out=y) is y and nn.gelu_tanh(plain, out=plain) is plain
    close(y, ref, dtype)
    np.testing.assert_array_equal(plain, ref)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.gelu_tanh(x, out=np.empty(x.shape, np.float16))


@numba.njit
def _exp_all(y, out):
    for i in range(y.size):
        out[i] = kernels._exp(y[i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_against_libm(dtype):
    # the whole range of each dtype, computed in that dtype: normal results within 2 ulp of the exact value,
    # subnormal ones within one subnormal step, 0 / inf / NaN exactly where NumPy's exp gives them
    rng = np.random.default_rng(0)
    lo, hi = (-760.0, 720.0) if dtype is np.float64 else (-110.0, 95.0)
    y = np.concatenate([np.linspace(lo, hi, 400_001), rng.uniform(-1, 1, 100_000),
                        [0.0, -0.0, 1e-30, -1e-30, np.log(np.finfo(dtype).max), -87.3, -103.9, -708.4, -745.1,
                         np.inf, -np.inf, np.nan]]).astype(dtype)
    out = np.empty_like(y)
    _exp_all(y, out)
    with np.errstate(over="ignore", under="ignore"):
        ref = np.exp(y)
        exact = np.exp(y.astype(np.longdouble))  # float64 inputs: long double's extra bits, where the platform has them
    normal = np.isfinite(ref) & (ref >= np.finfo(dtype).tiny)
    err = np.abs(out[normal].astype(np.longdouble) - exact[normal])
    assert np.all(err <= 2 * np.spacing(ref[normal]))
    sub = ~normal & np.isfinite(ref)
    assert np.all(np.abs(out[sub] - ref[sub]) <= np.finfo(dtype).smallest_subnormal)
    for special in (np.isinf, np.isnan, lambda a: a == 0):
        assert np.array_equal(special(out), special(ref))


def test_upcast_every_float16_exactly():
    # all 65,536 bit patterns (zeros, subnormals, normals, inf, NaN payloads), bit for bit, in a 2-D and a
    # transposed (copied first) array (the memory-mapped case: test_upcast_from_a_memory_map)
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    for w in (every, every.T):
        up = kernels.upcast(w, np.float32)
        assert up.shape == w.shape and up.dtype == np.float32
        assert np.array_equal(up.view(np.uint32), w.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(m=st.integers(0, kernels.FEW_ROWS + 2), k=dims, n=dims, stored=st.sampled_from(DTYPES + [np.float16]),
       seed=seeds)
def test_products_with_stored_weights(dtype, m, k, n, stored, seed):
    # few rows: each weight row read (and converted) once inside the product; more rows: upcast, then BLAS
    rng = np.random.default_rng(seed)
    x, w = rand(rng, (m, k), dtype), rand(rng, (n, k), stored)
    ref = x @ w.astype(dtype).T  # the compute dtype is the activation's, as nn.linear's plain form
    close(kernels.matmul_t(x, w), ref, dtype)
    wide = np.zeros((n, 2 * k), stored)
    wide[:, ::2] = w
    close(kernels.matmul_t(x.T.copy().T, wide[:, ::2]), ref, dtype)  # F-order x, a strided weight


def test_upcast_every_bfloat16_exactly():
    # bfloat16 arrives undecoded (converters.tensors.BF16): all 65,536 patterns bit for bit, fast path and the
    # converters' decoder (the plain path) each against the definition, float32 bits = bfloat16 bits << 16
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    every = bits.view(BF16)
    for w, b in ((every, bits), (every.T, bits.T)):
        want = b.astype(np.uint32) << 16
        up = kernels.upcast(w, np.float32)
        assert up.shape == w.shape and up.dtype == np.float32
        assert np.array_equal(up.view(np.uint32), want)
        assert np.array_equal(to_float32(w).view(np.uint32), want)


def test_products_reuse_the_upcast_buffer():
    # float16 weights large enough for the parallel upcast go through one per-thread buffer: a smaller weight after
    # a larger one, a larger one after (the buffer grows), each product right; above the limit, a fresh array
    rng = np.random.default_rng(0)
    x = rand(rng, (kernels.FEW_ROWS + 5, 300), np.float32)
    kernels._scratch.buf = None
    for n, size in ((400, 400 * 300), (250, 400 * 300), (900, 900 * 300)):
        w = rand(rng, (n, 300), np.float16)
        close(kernels.matmul_t(x, w), x @ w.astype(np.float32).T, np.float32)
        assert kernels._scratch.buf.size == size  # kept, grown only when too small
    saved = kernels.SCRATCH_LIMIT
    kernels.SCRATCH_LIMIT = 900 * 300 * 4
    try:
        kept = kernels._scratch.buf
        w = rand(rng, (1000, 300), np.float16)  # above the limit: a fresh array, the kept buffer untouched
        close(kernels.matmul_t(x, w), x @ w.astype(np.float32).T, np.float32)
        assert kernels._scratch.buf is kept
    finally:
        kernels.SCRATCH_LIMIT = saved


def test_upcast_from_a_memory_map(tmp_path):
    w = np.random.default_rng(0).standard_normal((300, 700)).astype(np.float16)
    w.tofile(tmp_path / "w.bin")
    mapped = np.memmap(tmp_path / "w.bin", np.float16, "r", shape=w.shape)
    assert np.array_equal(kernels.upcast(mapped, np.float32), w.astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_at_extremes(dtype):
    # exp(-2u) and exp(-y) overflow to inf (x / inf = -0), ±inf and NaN inputs, tiny inputs
    x = np.array([-1e30, -1e4, -100.0, -20.0, -1e-30, -0.0, 0.0, 1e-30, 20.0, 100.0, 1e4, 1e30,
                  np.inf, -np.inf, np.nan], dtype)
    def each(fast, ref, arg):
        # per element, against the argument's magnitude (|GELU(x)|, |SiLU(x)| ≤ |x|): ``close`` would scale
        # by the infinite maximum. The plain forms round to 0 where the exact value is tiny (tanh's 1 + (-1)
        # for GELU(-20), scipy's float32 expit(-100)); the fast forms keep it, within that tolerance.
        assert fast.dtype == ref.dtype == dtype
        finite = np.isfinite(ref)
        assert np.array_equal(fast[~finite], ref[~finite], equal_nan=True)
        assert np.all(np.abs(fast[finite] - ref[finite]) <= TOL[dtype] * np.abs(arg[finite]) + np.finfo(dtype).tiny)
        nonzero = finite & (ref != 0)
        assert np.array_equal(np.signbit(fast[nonzero]), np.signbit(ref[nonzero]))

    with np.errstate(over="ignore", invalid="ignore"):
        each(kernels.gelu_tanh(x), nn.gelu_tanh(x), x)
        img = x[:12].reshape(1, 1, 12, 1)  # weight 0: every output is SiLU(bias)
        w, b = np.zeros(1, dtype), np.zeros(1, dtype)
        for bias in x:
            b[0] = bias
            each(kernels.group_norm_silu(img, 1, w, b), nn.group_norm_silu(img, 1, w, b), np.full(img.shape, bias))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), lq=dims, lk=dims, hd=st.integers(1, 9),
       mask=st.sampled_from([None, "bias", "causal"]), budget=st.sampled_from([1, 200, None]),
       scale=st.sampled_from([0.3, 1.0, -0.7]), seed=seeds)
def test_attention(dtype, b, h, lq, lk, hd, mask, budget, scale, seed):
    # budget=1 forces one query per block; 200 bytes a few; None the default (one block here).
    rng = np.random.default_rng(seed)
    q, k, v = (rand(rng, (b, h, n, hd), dtype) for n in (lq, lk, lk))
    m = {None: None, "bias": rand(rng, (1, h, lq, lk), dtype),
         "causal": np.triu(np.full((lq, lk), -np.inf, dtype), 1)}[mask]
    close(kernels.attention(q, k, v, scale, m, budget), nn.attention(q, k, v, scale, m), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 5), l=dims, hd=st.integers(1, 9), seed=seeds)
def test_attention_on_views_of_a_projection(dtype, b, h, l, hd, seed):
    # q, k, v as every caller passes them: (B, heads, L, hd) views of one (B, L, 3, heads, hd) projection, read in
    # place; the result merges back to (B, L, heads·hd) as a view
    rng = np.random.default_rng(seed)
    qkv = rand(rng, (b, l, 3, h, hd), dtype)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    fast, ref = kernels.attention(q, k, v, 0.4), nn.attention(q, k, v, 0.4)
    close(fast, ref, dtype)
    merged = fast.transpose(0, 2, 1, 3).reshape(b, l, h * hd)
    assert np.shares_memory(merged, fast)
    close(merged, ref.transpose(0, 2, 1, 3).reshape(b, l, h * hd), dtype)
    close(kernels.attention(q[..., ::-1], k, v[:, :, ::-1], 0.4), nn.attention(q[..., ::-1], k, v[:, :, ::-1], 0.4),
          dtype)  # reversed axes: copied first


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 11), w=st.integers(1, 11), i=st.integers(1, 5), o=st.integers(1, 5),
       k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.sampled_from([0, 1, 2, ((0, 1), (0, 1)), ((2, 0), (1, 3))]),
       up=st.sampled_from([1, 2, 3]), bias=st.booleans(), budget=st.sampled_from([1, None]), seed=seeds)
def test_conv2d(dtype, b, h, w, i, o, k, stride, pad, up, bias, budget, seed):
    # padding and upsampling are read in place by the fast im2col: every border, factor and block split
    rng = np.random.default_rng(seed)
    x, wt = rand(rng, (b, h + k, w + k, i), dtype), rand(rng, (o, i, k, k), np.float16)
    bs = rand(rng, o, dtype) if bias else None
    close(kernels.conv2d(x, wt, bs, stride, pad, up, budget), nn.conv2d(x, wt, bs, stride, pad, up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_parameters_of_every_broadcast_shape(dtype):
    # adaLN's (B, 1, D) and (1, 1, D) mixed, per-token (1, L, D) and (L, D) tables, an empty D
    rng = np.random.default_rng(0)
    x = rand(rng, (3, 5, 4), dtype)
    for shift, scale in [((3, 1, 4), (1, 1, 4)), ((1, 1, 4), (3, 1, 4)), ((1, 5, 4), (3, 1, 4)), ((5, 4), (4,))]:
        sh, sc = rand(rng, shift, dtype, 1.0), rand(rng, scale, dtype, 1.0)
        close(kernels.layer_norm_modulate(x, sh, sc, 1e-6), exact(nn.layer_norm_modulate, x, sh, sc, 1e-6), dtype)
        close(kernels.layer_norm(x, sc, sh, 1e-5), exact(nn.layer_norm, x, sc, sh, 1e-5), dtype)
    assert kernels.layer_norm(np.ones((2, 0), dtype)).shape == (2, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_of_non_c_order_input(dtype):
    rng = np.random.default_rng(0)
    gw, gb = rand(rng, 6, dtype), rand(rng, 6, dtype)
    for x in (np.asfortranarray(rand(rng, (2, 4, 5, 6), dtype)), rand(rng, (2, 5, 4, 6), dtype).transpose(0, 2, 1, 3)):
        close(kernels.group_norm(x, 2, gw, gb), nn.group_norm(x, 2, gw, gb), dtype)
        close(kernels.group_norm_silu(x, 3, gw, gb), nn.group_norm_silu(x, 3, gw, gb), dtype)
    empty = np.ones((1, 0, 4, 6), dtype)  # as the plain form: an empty image normalises to an empty image
    assert kernels.group_norm(empty, 2, gw, gb).shape == kernels.group_norm_silu(empty, 2, gw, gb).shape == empty.shape


def test_conv2d_bad_and_empty_shapes():
    x = np.ones((1, 3, 3, 4), np.float32)
    with pytest.raises(ValueError, match="4 channels"):
        kernels.conv2d(x, np.ones((3, 2, 1, 1), np.float32))
    with pytest.raises(ValueError, match="padding"):
        kernels.conv2d(x, np.ones((3, 4, 1, 1), np.float32), padding=-1)
    narrow, w, b = np.ones((1, 5, 2, 2), np.float32), np.ones((3, 2, 3, 3), np.float32), np.ones(3, np.float32)
    fast, ref = kernels.conv2d(narrow, w, b), nn.conv2d(narrow, w, b)  # output width 0
    assert fast.shape == ref.shape == (1, 3, 0, 3)


def test_gelu_of_other_dtypes_and_shapes():
    for x in (np.float32(1.5) * np.ones((), np.float32), np.arange(-3, 4), np.linspace(-3, 3, 7).astype(np.float16)):
        fast, ref = kernels.gelu_tanh(x), nn.gelu_tanh(x)
        assert fast.shape == ref.shape and fast.dtype == ref.dtype
        tol = 2e-3 if x.dtype == np.float16 else 1e-6  # float16: the plain form computes in float16, the fast in float32
        np.testing.assert_allclose(fast.astype(np.float64), ref.astype(np.float64), rtol=0,
                                   atol=tol * max(1.0, float(np.abs(ref).max())))
    z = np.ones((), np.float32)
    assert kernels.gelu_tanh(z, out=z) is z and abs(float(z) - float(nn.gelu_tanh(np.ones((), np.float32)))) < 1e-6


def test_switch_routes_nn_to_kernels():
    saved = nn._kernels
    try:
        nn.use_kernels(True)
        assert nn._kernels is kernels
        nn.use_kernels(False)
        assert nn._kernels is None
    finally:
        nn._kernels = saved


_ON_HEAP = """
import numpy as np, sd3ref
a = np.ones(16 << 20, np.float32)  # 64 MiB: above glibc's largest mmap threshold
maps = open("/proc/self/maps").read().splitlines()
heap = [[int(v, 16) for v in line.split()[0].split("-")] for line in maps if line.endswith("[heap]")]
print(sd3ref.REUSES_FREED_ARRAYS, any(lo <= a.ctypes.data < hi for lo, hi in heap))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc options")
@pytest.mark.parametrize("env, on_heap", [({}, True), ({"MALLOC_MMAP_MAX_": "65536"}, False)])
def test_large_arrays_come_from_the_reused_heap(env, on_heap):
    # import sd3ref has glibc serve large arrays from its heap (no fresh mapping to zero-fill per array),
    # unless the environment sets malloc's options itself
    outside = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")
    base = {k: v for k, v in os.environ.items() if k not in outside}
    r = subprocess.run([sys.executable, "-c", _ON_HEAP], env={**base, **env}, capture_output=True, text=True,
                       check=True)
    assert r.stdout.split() == [str(on_heap)] * 2


@pytest.mark.parametrize("set_name", verify.golden_sets())
def test_golden_parity_on_the_plain_path(set_name):
    # tests/test_parity.py and `verify` run with the kernels on (the default); this runs the plain twins.
    rows = verify.set_rows(verify.GOLDEN / set_name)
    failed = [r for r in rows if r["status"] != "PASS"]
    assert rows and not failed, "\n" + verify.format_table(failed)
