"""MMDiT / MMDiT-X (SD3, SD3.5) with Stability's weight names, scoped to ``model.diffusion_model.``.

Latents are NHWC (B, H, W, C); the output is the rectified-flow velocity, NHWC.
"""

from __future__ import annotations

import math

import numpy as np

from . import nn, trace
from .config import SD3Config

EPS = 1e-6  # every MMDiT LayerNorm (no affine) and the q/k RMSNorms
# Trace names of the adaLN chunks in Stability's order (diffusers' variable names).
CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp",
          "shift_msa2", "scale_msa2", "gate_msa2")
FINAL_CHUNKS = ("shift", "scale")


def patchify_positions(pos_embed, h, w):
    """Centre crop of the (1, P², D) position table for an h×w patch grid → (h·w, D).
    top and left are floored independently, so non-square grids are off-centre the same way as in SAI."""
    D = pos_embed.shape[-1]
    P = math.isqrt(pos_embed.shape[-2])
    if h > P or w > P:
        raise ValueError(f"patch grid {h}x{w} exceeds the {P}x{P} position table")
    top, left = (P - h) // 2, (P - w) // 2
    return pos_embed.reshape(P, P, D)[top:top + h, left:left + w].reshape(h * w, D)


def timestep_embedding(t, dim=256, max_period=10000.0):
    """Sinusoid of the float timestep t = σ·1000 (not rounded) → (B, dim), cos first.
    freq_k = exp(-ln(max_period)·k/(dim/2)), computed in t's dtype with the frameworks' operation order."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def unpatchify(x, h, w, p, c):
    """(B, h·w, p·p·c) with features ordered (pi, pj, c) → NHWC (B, h·p, w·p, c)."""
    B = x.shape[0]
    return x.reshape(B, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(B, h * p, w * p, c)


def _mlp(w, x):
    """Linear → SiLU → Linear (the t and y embedders)."""
    return nn.dense(nn.silu(nn.dense(x, w, "mlp.0")), w, "mlp.2")


def _modulation(w, c, n, name, chunk_names=CHUNKS):
    """adaLN = Linear(SiLU(c)) split into n contiguous (B, 1, D) chunks, in Stability's order."""
    mod = nn.dense(nn.silu(c), w, "adaLN_modulation.1")  # (B, n·D)
    chunks = np.split(mod[:, None, :], n, axis=-1)
    for chunk_name, chunk in zip(chunk_names, chunks):
        trace.record(f"{name}.mod.{chunk_name}", chunk[:, 0])
    return chunks


def _qkv(w, attn, x, heads, qk_norm, names, into=None):
    """The fused projection as (B, L, 3, heads, hd) — its features are laid out (3, heads, hd), not
    (heads, 3, hd) — with q and k RMS-normalised per head when ``qk_norm``, written into ``into`` (this
    stream's rows of the joint sequence) when given. Traced under ``names`` as q, k, v (B, heads, L, hd)."""
    B, L, D = x.shape
    qkv = nn.dense(x, w, attn + ".qkv").reshape(B, L, 3, heads, D // heads)
    into = qkv if into is None else into
    if qk_norm:  # per head, over hd; q and k in one call: their weights stacked (2, 1, hd)
        scales = np.stack([np.asarray(w[attn + ".ln_q.weight"]), np.asarray(w[attn + ".ln_k.weight"])])
        nn.rms_norm(qkv[:, :, :2], scales[:, None], EPS, out=into[:, :, :2])  # in place when into is qkv
    if into is not qkv:  # v (and, without qk-norm, q and k) into this stream's rows
        rest = slice(2, 3) if qk_norm else slice(None)
        into[:, :, rest] = qkv[:, :, rest]
    for i, n in enumerate(names):
        trace.record(n, into[:, :, i].transpose(0, 2, 1, 3))
    return into


def _attention(qkv):
    """Self-attention over the sequence of a (B, L, 3, heads, hd) projection → (B, L, heads·hd)."""
    B, L, _, heads, hd = qkv.shape
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, heads, L, hd) views, no copies
    a = nn.attention(q, k, v, 1.0 / math.sqrt(hd))
    return a.transpose(0, 2, 1, 3).reshape(B, L, heads * hd)  # a view of the fast path's output


def _gated_residual(x, gate, h):
    """x + gate·h, computed in h (a fresh layer output the caller drops): the same roundings, no temporaries."""
    h *= gate
    h += x
    return h


def _mlp_residual(w, x, shift, scale, gate, name):
    h = nn.layer_norm_modulate(x, shift, scale, EPS)
    h = nn.dense(h, w, "mlp.fc1")  # (B, L, mlp_ratio·D)
    h = nn.dense(nn.gelu_tanh(h, out=h), w, "mlp.fc2")
    trace.record(name + ".mlp", h)
    x = _gated_residual(x, gate, h)
    trace.record(name + ".out", x)
    return x


def joint_block(w, config: SD3Config, context, x, c, pre_only, dual, name):
    """One joint block; w is scoped to ``joint_blocks.{i}.``, ``name`` is its trace name.
    Returns (context or None, x)."""
    heads, qk_norm = config.mmdit_num_heads, config.mmdit_qk_norm is not None
    cw, xw = nn.Scope(w, "context_block."), nn.Scope(w, "x_block.")
    B, Lc = context.shape[:2]
    # The joint attention's sequence [context; x], context first: each stream projects into its rows.
    qkv = np.empty((B, Lc + x.shape[1], 3, heads, config.mmdit_head_dim), x.dtype)

    # Context stream. The last block is "pre-only": 2 chunks (shift, scale) and only qkv.
    cm = _modulation(cw, c, 2 if pre_only else 6, name + ".context")
    _qkv(cw, "attn", nn.layer_norm_modulate(context, cm[0], cm[1], EPS), heads, qk_norm,
         [f"{name}.context.{n}" for n in "qkv"], into=qkv[:, :Lc])

    # Image stream. Dual (MMDiT-X) blocks have 9 chunks; attn2 reuses LN(x) with chunks 6..8.
    xm = _modulation(xw, c, 9 if dual else 6, name + ".x")
    x_in = x
    _qkv(xw, "attn", nn.layer_norm_modulate(x_in, xm[0], xm[1], EPS), heads, qk_norm,
         [f"{name}.x.{n}" for n in "qkv"], into=qkv[:, Lc:])

    # No mask: zero-padded context tokens take part.
    a = _attention(qkv)  # (B, Lc + N, D)
    ca, xa = a[:, :Lc], a[:, Lc:]
    if not pre_only:
        trace.record(name + ".context.sdpa", ca)
    trace.record(name + ".x.sdpa", xa)

    xa = nn.dense(xa, xw, "attn.proj")
    trace.record(name + ".x.attn", xa)
    x = _gated_residual(x, xm[2], xa)
    if dual:  # self-attention over image tokens only; residual after attn1, before the MLP
        qkv2 = _qkv(xw, "attn2", nn.layer_norm_modulate(x_in, xm[6], xm[7], EPS), heads, qk_norm,
                    [f"{name}.x.{n}2" for n in "qkv"])
        a2 = _attention(qkv2)
        trace.record(name + ".x.sdpa2", a2)
        a2 = nn.dense(a2, xw, "attn2.proj")
        trace.record(name + ".x.attn2", a2)
        x = _gated_residual(x, xm[8], a2)
    x = _mlp_residual(xw, x, xm[3], xm[4], xm[5], name + ".x")

    if pre_only:
        return None, x
    ca = nn.dense(ca, cw, "attn.proj")
    trace.record(name + ".context.attn", ca)
    context = _gated_residual(context, cm[2], ca)
    return _mlp_residual(cw, context, cm[3], cm[4], cm[5], name + ".context"), x


def forward(weights, config: SD3Config, latents, timestep, context, pooled, dtype="float32"):
    """latents (B, H, W, C) NHWC, timestep (B,) = σ·1000, context (B, Lc, context_dim), pooled (B, pooled_dim)
    → velocity (B, H, W, C)."""
    latents, context, pooled = (np.asarray(a, dtype) for a in (latents, context, pooled))
    t = np.asarray(timestep, dtype).reshape(-1)
    p = config.mmdit_patch_size
    B, H, W, C = latents.shape
    h, w = H // p, W // p

    x = nn.conv2d(latents, weights["x_embedder.proj.weight"], weights["x_embedder.proj.bias"], stride=p)
    x = x.reshape(B, h * w, -1)  # (B, N, D), row-major tokens
    x = x + np.asarray(patchify_positions(weights["pos_embed"], h, w), dtype)
    trace.record("mmdit.x_embed", x)

    trace.record("mmdit.timestep", t)
    t_freq = timestep_embedding(t)
    trace.record("mmdit.t_freq", t_freq)
    t_embed = _mlp(nn.Scope(weights, "t_embedder."), t_freq)  # (B, D)
    trace.record("mmdit.t_embed", t_embed)
    y_embed = _mlp(nn.Scope(weights, "y_embedder."), pooled)
    trace.record("mmdit.y_embed", y_embed)
    c = t_embed + y_embed
    trace.record("mmdit.c", c)
    context = nn.dense(context, weights, "context_embedder")  # (B, Lc, D)
    trace.record("mmdit.context_embed", context)

    last = config.mmdit_num_layers - 1
    for i in range(config.mmdit_num_layers):
        context, x = joint_block(nn.Scope(weights, f"joint_blocks.{i}."), config, context, x, c,
                                 pre_only=i == last, dual=i in config.mmdit_dual_attention_indices,
                                 name=f"mmdit.blocks.{i}")

    # Final layer: 2 chunks, shift FIRST (diffusers stores (scale, shift); the canonical file does not).
    fw = nn.Scope(weights, "final_layer.")
    shift, scale = _modulation(fw, c, 2, "mmdit.final", FINAL_CHUNKS)
    x = nn.dense(nn.layer_norm_modulate(x, shift, scale, EPS), fw, "linear")  # (B, N, p·p·C)
    trace.record("mmdit.final.linear", x)
    v = unpatchify(x, h, w, p, config.latent_channels)
    trace.record("mmdit.velocity", v)
    return v
