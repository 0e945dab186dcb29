"""CLIP text encoder (CLIP-L and CLIP-G / OpenCLIP bigG), HF transformers weight names.

Weights are scoped to ``text_encoders.clip_{l,g}.transformer.``: ``text_model.*`` plus an optional
``text_projection.weight``.
"""

from __future__ import annotations

import math

import numpy as np

from . import nn, trace
from .config import CLIPConfig


def _block(w, config: CLIPConfig, x, causal, name):
    B, L, D = x.shape
    heads = config.num_heads
    hd = D // heads

    h = nn.layer_norm(x, w["layer_norm1.weight"], w["layer_norm1.bias"], config.layer_norm_epsilon)
    q, k, v = (nn.dense(h, w, f"self_attn.{n}_proj").reshape(B, L, heads, hd).transpose(0, 2, 1, 3)
               for n in "qkv")  # (B, heads, L, hd)
    a = nn.attention(q, k, v, 1.0 / math.sqrt(hd), causal)
    a = nn.dense(a.transpose(0, 2, 1, 3).reshape(B, L, D), w, "self_attn.out_proj")
    trace.record(name + ".attn", a)
    x = x + a

    h = nn.layer_norm(x, w["layer_norm2.weight"], w["layer_norm2.bias"], config.layer_norm_epsilon)
    h = nn.dense(nn.ACTIVATIONS[config.intermediate_activation](nn.dense(h, w, "mlp.fc1")), w, "mlp.fc2")
    trace.record(name + ".mlp", h)
    x = x + h
    trace.record(name + ".out", x)
    return x


def encode(weights, config: CLIPConfig, token_ids, dtype="float32", name="clip") -> dict:
    """token_ids (B, L) int → dict of
    ``intermediate`` (B, L, D): output of block ``intermediate_output_index``, no final LN (SD3's context),
    ``sequence`` (B, L, D): final-LN output,
    ``eos`` (B, D): ``sequence`` at the EOS token, unprojected (Stability's CLIP-L pooled vector),
    ``pooled`` (B, D): ``eos @ text_projection.T`` (identity when the weights hold no projection).
    ``name`` prefixes the trace names (``clip_l``, ``clip_g``; docs/porting.md).
    """
    ids = np.asarray(token_ids)
    tm = nn.Scope(weights, "text_model.")
    L = ids.shape[1]
    if L > config.max_sequence_length:
        raise ValueError(f"{name}: {L} token ids, but the encoder has {config.max_sequence_length} positions")

    x = (np.asarray(tm["embeddings.token_embedding.weight"][ids], dtype)
         + np.asarray(tm["embeddings.position_embedding.weight"][:L], dtype))  # (B, L, D)
    trace.record(name + ".embeddings", x)
    # Causal mask only: pad tokens are NOT masked (SD3 relies on it; CLIP-G pads with 0, CLIP-L with EOS).
    causal = np.triu(np.full((L, L), -np.inf, dtype), k=1)

    intermediate = None
    for i in range(config.num_layers):
        x = _block(nn.Scope(tm, f"encoder.layers.{i}."), config, x, causal, f"{name}.layers.{i}")
        if i == config.intermediate_output_index:
            intermediate = x

    sequence = nn.layer_norm(x, tm["final_layer_norm.weight"], tm["final_layer_norm.bias"],
                             config.final_layer_norm_epsilon)
    # The EOS token (id 49407) is the largest id; argmax takes its first occurrence, so CLIP-L's
    # EOS-padding does not move it. transformers reads the first eos_token_id instead, unless its config
    # has the legacy id 2 (CLIPConfig.eos_token_id): the same position except with added tokens above EOS.
    at = ids.argmax(-1) if config.eos_token_id is None else (ids == config.eos_token_id).argmax(-1)
    eos = sequence[np.arange(ids.shape[0]), at]  # (B, D)
    pooled = nn.linear(eos, weights["text_projection.weight"]) if "text_projection.weight" in weights else eos
    trace.record(name + ".final_layer_norm", sequence)
    trace.record(name + ".eos", eos)
    trace.record(name + ".pooled", pooled)
    return {"intermediate": intermediate, "sequence": sequence, "eos": eos, "pooled": pooled}
