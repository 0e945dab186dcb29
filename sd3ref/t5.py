"""T5 v1.1 encoder (T5-XXL in SD3), HF transformers weight names.

Weights are scoped to ``text_encoders.t5xxl.transformer.`` (``shared.weight``, ``encoder.*``).
"""

from __future__ import annotations

import math

import numpy as np

from . import nn, trace
from .config import T5Config


def relative_position_buckets(length, num_buckets=32, max_distance=128):
    """Bidirectional T5 bucket of ``key_pos - query_pos`` for every (query, key) pair → (L, L) int.

    Half the buckets are for keys after the query. Within a half, distances below ``num_buckets // 4``
    get their own bucket; larger ones are binned logarithmically up to ``max_distance`` and the bin index
    is truncated (``int``), as in Mesh TensorFlow. transformers and KerasHub compute that bin in float32
    (even in a float64 model), and so does this: in float64, 8 of 1,260 (num_buckets, max_distance) pairs
    put an exact-log distance one bucket higher (e.g. 18 buckets, 128, at distances 8, 16 and 64; the
    default 32 / 128 agrees at every distance). With NumPy's float32 log all 1,260 pairs up to 128 buckets
    matched transformers' function (by hand, session 5; the golden sets hold 13 of the pairs, ``t5/buckets_*``,
    which ``verify`` checks). A float32 log may differ in its last bit between libraries and CPUs, which only
    matters where the exact value is a whole number."""
    pos = np.arange(length)
    rel = pos[None, :] - pos[:, None]  # (Lq, Lk): key - query
    half = num_buckets // 2
    exact = half // 2
    n = np.abs(rel)
    # (the maximum keeps log away from 0 on the small branch, which the where discards)
    ratio = np.maximum(n, exact).astype(np.float32) / np.float32(exact)
    large = exact + (np.log(ratio) / np.float32(math.log(max_distance / exact))
                     * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (rel > 0) * half + np.where(n < exact, n, large)


def encode(weights, config: T5Config, token_ids, dtype="float32"):
    """token_ids (B, L) int → last hidden state after the final RMSNorm (B, L, D).

    No attention mask: SD3 feeds T5 an all-ones mask, so pad tokens attend and are attended to."""
    ids = np.asarray(token_ids)
    B, L = ids.shape
    heads, kv = config.num_heads, config.key_value_dim
    act = nn.ACTIVATIONS[config.activation]
    eps = config.layer_norm_epsilon

    x = np.asarray(weights["shared.weight"][ids], dtype)  # (B, L, D); T5 does not scale embeddings
    trace.record("t5.embeddings", x)
    # Only block 0 owns the relative-position table; its bias is reused by every layer.
    table = np.asarray(weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], dtype)
    buckets = relative_position_buckets(L, config.relative_attention_num_buckets,
                                        config.relative_attention_max_distance)
    bias = table[buckets].transpose(2, 0, 1)[None]  # (1, heads, L, L)

    for i in range(config.num_layers):
        w = nn.Scope(weights, f"encoder.block.{i}.")
        h = nn.rms_norm(x, w["layer.0.layer_norm.weight"], eps)
        q, k, v = (nn.dense(h, w, f"layer.0.SelfAttention.{n}").reshape(B, L, heads, kv).transpose(0, 2, 1, 3)
                   for n in "qkv")  # (B, heads, L, kv)
        # No 1/sqrt(d) scaling: T5 folds it into the initialisation of q.
        a = nn.attention(q, k, v, 1.0, bias)
        a = nn.dense(a.transpose(0, 2, 1, 3).reshape(B, L, heads * kv), w, "layer.0.SelfAttention.o")
        trace.record(f"t5.layers.{i}.attn", a)
        x = x + a

        h = nn.rms_norm(x, w["layer.1.layer_norm.weight"], eps)
        h = act(nn.dense(h, w, "layer.1.DenseReluDense.wi_0")) * nn.dense(h, w, "layer.1.DenseReluDense.wi_1")
        h = nn.dense(h, w, "layer.1.DenseReluDense.wo")
        trace.record(f"t5.layers.{i}.mlp", h)
        x = x + h
        trace.record(f"t5.layers.{i}.out", x)

    x = nn.rms_norm(x, weights["encoder.final_layer_norm.weight"], eps)
    trace.record("t5.final_layer_norm", x)
    return x
