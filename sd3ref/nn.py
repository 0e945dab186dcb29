"""NumPy primitives shared by every component.

Conventions: activations are NHWC / (B, L, D); weights keep torch layouts (Linear (out, in), Conv OIHW),
because the canonical checkpoint is Stability's torch file. The compute dtype is the dtype of the
activation: weights are upcast to it at use (``np.asarray(w, x.dtype)``), so float16 or memory-mapped
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


def linear(x, w, b=None):
    """``x @ w.T + b`` with a torch-layout weight ``w`` of shape (out, in)."""
    # One 2-D product: NumPy runs (B, L, in) @ (in, out) as B separate products, measured 2.5× slower.
    y = (x.reshape(-1, x.shape[-1]) @ np.asarray(w, x.dtype).T).reshape(*x.shape[:-1], -1)
    if b is not None:
        y += np.asarray(b, x.dtype)  # in place: y is ours, a second (B, L, out) array would be one more pass
    return y


def dense(x, weights, name):
    """The Linear layer ``name`` of a weight mapping (``name.weight``, optional ``name.bias``)."""
    bias = name + ".bias"
    return linear(x, weights[name + ".weight"], weights[bias] if bias in weights else None)


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


def rms_norm(x, weight=None, eps=1e-6):
    """RMSNorm over the last axis: no mean subtraction, no bias."""
    if _kernels:
        return _kernels.rms_norm(x, weight, eps)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if weight is None else y * np.asarray(weight, x.dtype)


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


def group_norm_silu(x, groups, weight, bias, eps=1e-6):
    """SiLU(GroupNorm(x)), the VAE's pre-convolution pair."""
    if _kernels:
        return _kernels.group_norm_silu(x, groups, weight, bias, eps)
    return silu(group_norm(x, groups, weight, bias, eps))


def silu(x):
    return x * expit(x)


def gelu_tanh(x):
    """The tanh approximation (torch ``approximate="tanh"``, HF ``gelu_new``)."""
    if _kernels:
        return _kernels.gelu_tanh(x)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def gelu_erf(x):
    """Exact GELU. scipy's erf keeps float32 and float64 as they are."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation: x·sigmoid(1.702x)."""
    return x * expit(1.702 * x)


def relu(x):
    return np.maximum(x, 0)


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "gelu": gelu_erf, "quick_gelu": quick_gelu, "relu": relu, "silu": silu}


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


def conv_input(x, w, stride, padding):
    """Shared by both conv2d paths: the padded NHWC input, the weight in x's dtype and the output size.
    ``padding`` is an int (all sides) or ((top, bottom), (left, right))."""
    w = np.asarray(w, x.dtype)
    _, _, kh, kw = w.shape
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    x = np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    _, H, W, _ = x.shape
    return x, w, (H - kh) // stride + 1, (W - kw) // stride + 1


def conv2d(x, w, b=None, stride=1, padding=0):
    """2-D convolution of NHWC ``x`` with an OIHW weight; the VAE downsample pads ((0, 1), (0, 1)).

    Written as one matmul per kernel tap (im2col without materialising the patches)."""
    if _kernels:
        return _kernels.conv2d(x, w, b, stride, padding)
    x, w, Ho, Wo = conv_input(x, w, stride, padding)
    O, I, kh, kw = w.shape
    y = np.zeros((x.shape[0], Ho, Wo, O), x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride]  # (B, Ho, Wo, I)
            y += patch @ w[:, :, i, j].T
    return y if b is None else y + np.asarray(b, x.dtype)


def upsample_nearest2x(x):
    """Nearest-neighbour ×2 on NHWC."""
    return x.repeat(2, axis=1).repeat(2, axis=2)


use_kernels(os.environ.get("SD3REF_KERNELS", "1") != "0")
