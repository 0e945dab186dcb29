"""NumPy primitives shared by every component.

Conventions: activations are NHWC / (B, L, D); weights keep torch layouts (Linear (out, in), Conv OIHW),
because the canonical checkpoint is Stability's torch file. The compute dtype is the dtype of the
activation: weights are upcast to it at use (``upcast(w, x.dtype)``), so float16 or memory-mapped
weights cost nothing until a layer runs, and a float64 run never passes through float32. Scalars are Python
floats, which NumPy treats as "weak" and never uses to promote or demote an array.

The functions here are the plain-NumPy oracle. ``use_kernels(True)`` (the default; ``SD3REF_KERNELS=0``
turns it off) routes the hot ones — norms, GELU, attention, convolution — to their fast twins in
``sd3ref.kernels`` (numba, blocked BLAS), which the tests hold to these.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
from scipy.special import erf, expit

from converters.tensors import to_float32

_kernels = None  # the sd3ref.kernels module while the fast paths are on


def use_kernels(enabled: bool = True) -> None:
    """The one switch between the plain NumPy functions below and their fast twins in ``sd3ref.kernels``."""
    global _kernels
    if enabled:
        from . import kernels  # numba is imported (and its cache loaded) only when the fast paths are used
        _kernels = kernels
    else:
        _kernels = None


class Scope(Mapping):
    """Read-only view of the keys of ``weights`` that start with ``prefix``, with the prefix removed."""

    def __init__(self, weights: Mapping, prefix: str):
        self._weights, self._prefix = weights, prefix

    def __getitem__(self, key):
        return self._weights[self._prefix + key]

    def __contains__(self, key):
        return (self._prefix + key) in self._weights

    def __iter__(self):
        n = len(self._prefix)
        return (k[n:] for k in self._weights if k.startswith(self._prefix))

    def __len__(self):
        return sum(1 for _ in self)


def upcast(w, dtype):
    """A stored weight (float16, float32, undecoded bfloat16, memory-mapped or not) in the compute dtype."""
    if _kernels:
        return _kernels.upcast(w, dtype)
    return np.asarray(to_float32(w), dtype)


def linear(x, w, b=None):
    """``x @ w.T + b`` with a torch-layout weight ``w`` of shape (out, in)."""
    # One 2-D product: NumPy runs (B, L, in) @ (in, out) as B separate products, 2.5× slower (by hand).
    x2 = x.reshape(-1, x.shape[-1])
    y = (_kernels.matmul_t(x2, w) if _kernels else x2 @ upcast(w, x.dtype).T).reshape(*x.shape[:-1], -1)
    if b is not None:
        y += np.asarray(b, x.dtype)  # in place: y is ours, a second (B, L, out) array would be one more pass
    return y


def dense(x, weights, name):
    """The Linear layer ``name`` of a weight mapping (``name.weight``, optional ``name.bias``)."""
    bias = name + ".bias"
    return linear(x, weights[name + ".weight"], weights[bias] if bias in weights else None)


def _into(y, out):
    """y, or y written into ``out`` (an activation the caller no longer needs: writing over it spares a fresh
    array, whose pages the kernel must zero on first touch)."""
    if out is None:
        return y
    out[...] = y
    return out


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last axis with the biased (population) variance; affine parts optional."""
    if _kernels:
        return _kernels.layer_norm(x, weight, bias, eps)
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    y = xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    if weight is not None:
        y = y * np.asarray(weight, x.dtype)
    if bias is not None:
        y = y + np.asarray(bias, x.dtype)
    return y


def layer_norm_modulate(x, shift, scale, eps):
    """adaLN: LayerNorm without affine parts, then ``·(1 + scale) + shift`` (per batch, (B, 1, D))."""
    if _kernels:
        return _kernels.layer_norm_modulate(x, shift, scale, eps)
    return layer_norm(x, eps=eps) * (1.0 + scale) + shift


def rms_norm(x, weight=None, eps=1e-6, out=None):
    """RMSNorm over the last axis: no mean subtraction, no bias. ``out`` may be any view, x itself included."""
    if _kernels:
        return _kernels.rms_norm(x, weight, eps, out)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return _into(y if weight is None else y * np.asarray(weight, x.dtype), out)


def group_norm(x, groups, weight, bias, eps=1e-6):
    """GroupNorm on NHWC: the channel axis splits into ``groups`` contiguous groups (torch's order);
    statistics over (H, W, C/groups), biased variance."""
    if _kernels:
        return _kernels.group_norm(x, groups, weight, bias, eps)
    B, H, W, C = x.shape
    g = x.reshape(B, H, W, groups, C // groups)
    mu = g.mean(axis=(1, 2, 4), keepdims=True)
    gc = g - mu
    g = gc / np.sqrt((gc * gc).mean(axis=(1, 2, 4), keepdims=True) + eps)
    return g.reshape(B, H, W, C) * np.asarray(weight, x.dtype) + np.asarray(bias, x.dtype)


def group_norm_silu(x, groups, weight, bias, eps=1e-6, out=None):
    """SiLU(GroupNorm(x)), the VAE's pre-convolution pair. ``out`` may be x itself."""
    if _kernels:
        return _kernels.group_norm_silu(x, groups, weight, bias, eps, out)
    return _into(silu(group_norm(x, groups, weight, bias, eps)), out)


def silu(x):
    return x * expit(x)


def gelu_tanh(x, out=None):
    """The tanh approximation (torch ``approximate="tanh"``, HF ``gelu_new``). ``out`` may be x itself."""
    if _kernels:
        return _kernels.gelu_tanh(x, out)
    return _into(0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))), out)


def gelu_erf(x):
    """Exact GELU. scipy's erf keeps float32 and float64 as they are."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation: x·sigmoid(1.702x)."""
    return x * expit(1.702 * x)


def relu(x):
    return np.maximum(x, 0)


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "gelu": gelu_erf, "quick_gelu": quick_gelu, "relu": relu}


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def attention(q, k, v, scale, mask=None):
    """Scaled dot-product attention on (B, heads, L, hd). ``mask`` is added to the logits
    (a -inf entry blocks a key; T5 passes its position bias here)."""
    if _kernels:
        return _kernels.attention(q, k, v, scale, mask)
    logits = (q @ k.swapaxes(-1, -2)) * scale  # (B, heads, Lq, Lk)
    if mask is not None:
        logits = logits + mask
    return softmax(logits) @ v  # (B, heads, Lq, hd)


def pads(padding):
    """((top, bottom), (left, right)) from an int (all sides) or that pair of pairs."""
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    return tuple(tuple(p) for p in padding)


def conv2d(x, w, b=None, stride=1, padding=0, upsample=1):
    """2-D convolution of NHWC ``x`` with an OIHW weight. ``padding``: see ``pads`` (the VAE downsample pads
    ((0, 1), (0, 1))). ``upsample``: x is first upsampled by this factor, nearest neighbour (the VAE
    decoder's upsampling conv; the fast path reads the small x directly, never the upsampled copy).

    Written as one matmul per kernel tap (im2col without materialising the patches)."""
    if _kernels:
        return _kernels.conv2d(x, w, b, stride, padding, upsample)
    if upsample > 1:
        x = upsample_nearest(x, upsample)
    w = upcast(w, x.dtype)
    O, I, kh, kw = w.shape
    x = np.pad(x, ((0, 0), *pads(padding), (0, 0)))
    Ho, Wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], Ho, Wo, O), x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride]  # (B, Ho, Wo, I)
            y += patch @ w[:, :, i, j].T
    return y if b is None else y + np.asarray(b, x.dtype)


def upsample_nearest(x, factor=2):
    """Nearest-neighbour upsampling of NHWC by an integer factor."""
    return x.repeat(factor, axis=1).repeat(factor, axis=2)


use_kernels(os.environ.get("SD3REF_KERNELS", "1") != "0")
