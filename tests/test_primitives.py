"""Properties of the primitives against their direct definitions, in float32 and float64."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sd3ref import mmdit, nn, scheduler, t5

DTYPES = [np.float32, np.float64]
# Agreement between two float computations of the same formula (summation order differs).
RTOL = {np.float32: 2e-5, np.float64: 1e-12}

# Fewer examples than hypothesis' default, for this module only (a profile loaded here would also apply
# to every module collected after it)
few = settings(max_examples=40, deadline=None)


def finite(dtype, shape, lo=-8.0, hi=8.0):
    return arrays(dtype, shape, elements=st.floats(lo, hi, width=32))


def shapes(min_dims=2, max_dims=3, max_side=6):
    return st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


def close(a, b, dtype, cond=1.0):
    """``cond`` scales the absolute tolerance by the problem's condition number (see ``norm_cond``)."""
    assert a.dtype == dtype, f"result dtype {a.dtype}, expected {dtype}"
    np.testing.assert_allclose(a, b, rtol=RTOL[dtype], atol=RTOL[dtype] * cond)


def norm_cond(x, axis, eps):
    """A normalisation divides the rounding error of its mean (~ulp·max|x|) by sqrt(var + eps): for nearly
    constant inputs that amplifies it by up to max|x|/sqrt(eps), in float32 as in every framework."""
    x = x.astype(np.float64)
    return max(1.0, float((np.abs(x).max(axis) / np.sqrt(x.var(axis) + eps)).max()))


@pytest.mark.parametrize("dtype", DTYPES)
@few
@given(data=st.data())
def test_softmax(dtype, data):
    x = data.draw(finite(dtype, data.draw(shapes()), -50, 50))
    y = nn.softmax(x)
    # Direct definition in float64 (no max subtraction needed at this range).
    e = np.exp(x.astype(np.float64))
    close(y, e / e.sum(-1, keepdims=True), dtype)
    # Shift invariance: the stable form must not overflow.
    close(nn.softmax(x + dtype(500.0)), y, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@few
@given(data=st.data())
def test_layer_norm(dtype, data):
    shape = data.draw(shapes())
    x = data.draw(finite(dtype, shape))
    w = data.draw(finite(dtype, shape[-1:]))
    b = data.draw(finite(dtype, shape[-1:]))
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    var = ((x64 - mu) ** 2).sum(-1, keepdims=True) / shape[-1]  # biased
    ref = (x64 - mu) / np.sqrt(var + 1e-5)
    cond = norm_cond(x, -1, 1e-5)
    close(nn.layer_norm(x, eps=1e-5), ref, dtype, cond)
    close(nn.layer_norm(x, w, b, 1e-5), ref * w + b, dtype, cond * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("dtype", DTYPES)
@few
@given(data=st.data())
def test_rms_norm(dtype, data):
    shape = data.draw(shapes())
    x = data.draw(finite(dtype, shape))
    w = data.draw(finite(dtype, shape[-1:]))
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).sum(-1, keepdims=True) / shape[-1] + 1e-6) * w
    close(nn.rms_norm(x, w, 1e-6), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@few
@given(data=st.data())
def test_group_norm(dtype, data):
    groups = data.draw(st.integers(1, 4))
    per = data.draw(st.integers(1, 3))
    B, H, W = data.draw(st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4)))
    C = groups * per
    x = data.draw(finite(dtype, (B, H, W, C)))
    w, b = data.draw(finite(dtype, (C,))), data.draw(finite(dtype, (C,)))
    ref = np.empty((B, H, W, C))
    for n in range(B):
        for g in range(groups):  # contiguous channel groups
            blk = x[n, :, :, g * per:(g + 1) * per].astype(np.float64)
            ref[n, :, :, g * per:(g + 1) * per] = (blk - blk.mean()) / np.sqrt(blk.var() + 1e-6)
    cond = norm_cond(x.reshape(B, H, W, groups, per), (1, 2, 4), 1e-6) * max(1.0, np.abs(w).max())
    close(nn.group_norm(x, groups, w, b, 1e-6), ref * w + b, dtype, cond)


@pytest.mark.parametrize("dtype", DTYPES)
@few
@given(data=st.data())
def test_activations(dtype, data):
    x = data.draw(finite(dtype, data.draw(shapes(1, 2, 8)), -10, 10))
    xs = [float(v) for v in x.ravel()]
    ref = lambda f: np.array([f(v) for v in xs]).reshape(x.shape)  # noqa: E731
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    close(nn.gelu_erf(x), ref(lambda v: v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))), dtype)
    close(nn.gelu_tanh(x), ref(lambda v: 0.5 * v * (1.0 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))), dtype)
    close(nn.quick_gelu(x), ref(lambda v: v * sig(1.702 * v)), dtype)
    close(nn.silu(x), ref(lambda v: v * sig(v)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_variants_differ(dtype):
    # The tanh form is an approximation: the variants must not be silently interchangeable.
    x = np.linspace(-4, 4, 101, dtype=dtype)
    assert np.abs(nn.gelu_tanh(x) - nn.gelu_erf(x)).max() > 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@few
@given(data=st.data())
def test_conv2d_against_direct_sum(dtype, data):
    B, H, W, I, O = data.draw(st.tuples(st.integers(1, 2), st.integers(3, 6), st.integers(3, 6),
                                        st.integers(1, 3), st.integers(1, 3)))
    k = data.draw(st.sampled_from([1, 2, 3]))
    s = data.draw(st.sampled_from([1, 2]))
    pad = data.draw(st.sampled_from([0, 1, ((0, 1), (0, 1))]))
    x = data.draw(finite(dtype, (B, H, W, I)))
    w = data.draw(finite(dtype, (O, I, k, k)))
    b = data.draw(finite(dtype, (O,)))
    p = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
    xp = np.pad(x.astype(np.float64), ((0, 0), p[0], p[1], (0, 0)))
    Ho, Wo = (xp.shape[1] - k) // s + 1, (xp.shape[2] - k) // s + 1
    ref = np.empty((B, Ho, Wo, O))
    for i in range(Ho):
        for j in range(Wo):
            win = xp[:, i * s:i * s + k, j * s:j * s + k, :]  # (B, k, k, I)
            ref[:, i, j] = np.einsum("bhwi,oihw->bo", win, w.astype(np.float64)) + b
    close(nn.conv2d(x, w, b, stride=s, padding=pad), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_mask_and_upsample(dtype):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 5, 4)).astype(dtype) for _ in range(3))
    causal = np.triu(np.full((5, 5), -np.inf, dtype), 1)
    out = nn.attention(q, k, v, 0.5, causal)
    assert out.dtype == dtype
    # Row 0 sees only key 0.
    close(out[:, :, 0], v[:, :, 0].astype(np.float64), dtype)
    x = rng.standard_normal((1, 2, 3, 2)).astype(dtype)
    up = nn.upsample_nearest(x, 2)
    assert up.shape == (1, 4, 6, 2) and (up[:, 1::2, 1::2] == x).all() and (up[:, ::2, 1::2] == x).all()
    assert (nn.upsample_nearest(x, 3)[:, 2::3, ::3] == x).all()


@pytest.mark.parametrize("dtype", DTYPES)
@few
@given(h=st.integers(1, 5), w=st.integers(1, 5), p=st.sampled_from([1, 2]), c=st.integers(1, 4))
def test_patchify_unpatchify_identity(dtype, h, w, p, c):
    # The patch-embedding conv flattens a patch as (c, pi, pj) (OIHW); the final linear emits (pi, pj, c).
    # Both must be a bijection onto the same pixels: unpatchify(patchify(x)) == x.
    x = np.random.default_rng(h * 31 + w).standard_normal((2, h * p, w * p, c)).astype(dtype)
    patches = x.reshape(2, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(2, h * w, p * p * c)
    assert (mmdit.unpatchify(patches, h, w, p, c) == x).all()
    # And the conv with a one-hot kernel selecting feature (pi, pj, c) reproduces the same patches.
    eye = np.eye(p * p * c, dtype=dtype).reshape(p * p * c, p, p, c).transpose(0, 3, 1, 2)  # OIHW
    conv = nn.conv2d(x, eye, stride=p).reshape(2, h * w, p * p * c)
    assert (conv == patches).all()


@few
@given(P=st.integers(1, 12), data=st.data())
def test_position_crop_offsets(P, data):
    h, w = data.draw(st.integers(1, P)), data.draw(st.integers(1, P))
    D = 2
    grid = np.stack(np.meshgrid(np.arange(P), np.arange(P), indexing="ij"), -1)  # (P, P, 2): (row, col)
    table = grid.reshape(1, P * P, D).astype(np.float64)
    crop = mmdit.patchify_positions(table, h, w).reshape(h, w, D)
    top, left = (P - h) // 2, (P - w) // 2
    assert (crop[0, 0] == (top, left)).all()
    assert (crop[..., 0] == np.arange(top, top + h)[:, None]).all()
    assert (crop[..., 1] == np.arange(left, left + w)[None, :]).all()


def test_position_crop_too_large():
    with pytest.raises(ValueError):
        mmdit.patchify_positions(np.zeros((1, 16, 2)), 5, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@few
@given(t=st.lists(st.floats(0, 1000, width=32), min_size=1, max_size=4))
def test_timestep_embedding_closed_form(dtype, t):
    tt = np.array(t, dtype)
    emb = mmdit.timestep_embedding(tt)
    assert emb.shape == (len(t), 256) and emb.dtype == dtype
    k = np.arange(128)
    args = np.array(t, np.float64)[:, None] * np.exp(-math.log(10000.0) * k / 128)[None]
    ref = np.concatenate([np.cos(args), np.sin(args)], -1)  # cos first
    # float32: args up to 1000 rad carry ~1000·2^-24 of absolute error through the frequency.
    atol = 2e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(emb, ref, atol=atol, rtol=0)


@few
@given(n=st.integers(1, 60), shift=st.sampled_from([1.0, 2.5, 3.0, 6.0]))
def test_sigmas_decrease_from_one_to_zero(n, shift):
    s = scheduler.sigmas(n, shift)
    assert s.dtype == np.float64 and s.shape == (n + 1,)
    assert s[0] == 1.0 and s[-1] == 0.0
    assert (np.diff(s) < 0).all()
    np.testing.assert_allclose(scheduler.timesteps(s), s[:-1] * 1000)


def test_sigmas_double_shift():
    s = scheduler.sigmas(28, 3.0)
    # σ_min = S(0.001) is shifted a second time: S(S(0.001)) = 0.008929 (not 0.002994).
    assert round(s[-2], 6) == 0.008929
    assert round(s[1], 6) == 0.987381
    np.testing.assert_allclose(scheduler.sigmas(4, 3.0), [1.0, 0.857692, 0.602151, 0.008929, 0.0], atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_euler_and_add_noise(dtype):
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal((2, 3)).astype(dtype), rng.standard_normal((2, 3)).astype(dtype)
    s = scheduler.sigmas(5, 3.0)
    # Along the straight flow path the velocity is ε - x0, and Euler is exact.
    x = scheduler.add_noise(x0, eps, s[0])
    for i in range(5):
        x = scheduler.step(x, eps - x0, s[i], s[i + 1])
        close(x, scheduler.add_noise(x0, eps, s[i + 1]).astype(np.float64), dtype)


def test_t5_buckets():
    b = t5.relative_position_buckets(300)
    rel = np.arange(300)[None, :] - np.arange(300)[:, None]
    # Exact buckets for |rel| < 8, the sign in the upper half, 15 (+16) at and beyond max_distance.
    assert (b[rel == 0] == 0).all() and (b[rel == 5] == 21).all() and (b[rel == -5] == 5).all()
    assert (b[rel >= 128] == 31).all() and (b[rel <= -128] == 15).all()
    # The logarithmic bins, spelled out (Mesh TensorFlow): distance n ≥ 8 → 8 + int(log(n/8)/log(16)·8).
    for n in (8, 11, 16, 31, 32, 63, 64, 127):
        assert b[0, n] == 16 + min(8 + int(math.log(n / 8) / math.log(16) * 8), 15)
    assert b.min() >= 0 and b.max() <= 31
