"""The SD3 KL-VAE (LDM layout, no quant_conv), Stability names scoped to ``first_stage_model.``.

Images are NHWC in [-1, 1]; latents NHWC. ``to_latent`` / ``from_latent`` hold the SD3 latent
normalisation, which KerasHub applies in the backbone and diffusers in the pipeline.
"""

from __future__ import annotations

import math

import numpy as np

from . import nn, trace
from .config import VAEConfig


def _norm(w, name, config: VAEConfig, x):
    return nn.group_norm(x, config.num_groups, w[name + ".weight"], w[name + ".bias"], config.norm_epsilon)


def _norm_silu(w, name, config: VAEConfig, x, out=None):
    return nn.group_norm_silu(x, config.num_groups, w[name + ".weight"], w[name + ".bias"], config.norm_epsilon,
                              out=out)


def _conv(w, name, x, **kw):
    return nn.conv2d(x, w[name + ".weight"], w[name + ".bias"], **kw)


def _resnet(w, config, x):
    h = _conv(w, "conv1", _norm_silu(w, "norm1", config, x), padding=1)
    h = _conv(w, "conv2", _norm_silu(w, "norm2", config, h, out=h), padding=1)  # h is ours: in place
    if "nin_shortcut.weight" in w:  # 1×1 conv where the channel count changes
        x = _conv(w, "nin_shortcut", x)
    h += x  # the residual into h (ours): no third full-resolution array alive
    return h


def _attention(w, config, x):
    """Single-head self-attention over the H·W positions, 1×1-conv projections, scale 1/sqrt(C)."""
    B, H, W, C = x.shape
    h = _norm(w, "norm", config, x)
    q, k, v = (_conv(w, n, h).reshape(B, 1, H * W, C) for n in "qkv")
    a = nn.attention(q, k, v, 1.0 / math.sqrt(C)).reshape(B, H, W, C)
    a = _conv(w, "proj_out", a)
    a += x
    return a


def _mid(w, config, x, name):
    x = _resnet(nn.Scope(w, "mid.block_1."), config, x)
    x = _attention(nn.Scope(w, "mid.attn_1."), config, x)
    x = _resnet(nn.Scope(w, "mid.block_2."), config, x)
    trace.record(name + ".mid", x)
    return x


def encode(weights, config: VAEConfig, image, dtype="float32"):
    """image (B, H, W, 3) in [-1, 1] → (mean, logvar), each (B, H/8, W/8, latent_channels).
    logvar is clipped to [-30, 20] as in every SD3 implementation."""
    w = nn.Scope(weights, "encoder.")
    x = _conv(w, "conv_in", np.asarray(image, dtype), padding=1)
    trace.record("vae.encoder.conv_in", x)
    stages = len(config.encoder_num_filters)
    for i in range(stages):
        for j in range(config.encoder_num_blocks[i]):
            x = _resnet(nn.Scope(w, f"down.{i}.block.{j}."), config, x)
        if i < stages - 1:  # pad bottom/right only, then a valid stride-2 conv: (H, W) → (H/2, W/2)
            x = _conv(w, f"down.{i}.downsample.conv", x, stride=2, padding=((0, 1), (0, 1)))
        trace.record(f"vae.encoder.stages.{i}", x)
    x = _mid(w, config, x, "vae.encoder")
    x = _conv(w, "conv_out", _norm_silu(w, "norm_out", config, x), padding=1)  # (B, h, w, 2·latent)
    mean, logvar = np.split(x, 2, axis=-1)
    logvar = np.clip(logvar, -30.0, 20.0)
    trace.record("vae.encoder.mean", mean)
    trace.record("vae.encoder.logvar", logvar)
    return mean, logvar


def sample(mean, logvar, eps):
    """A posterior sample with caller-supplied noise ε (framework RNGs cannot be reproduced)."""
    return mean + np.exp(0.5 * logvar) * eps


def decode(weights, config: VAEConfig, z, dtype="float32"):
    """z (B, h, w, latent_channels), already through ``from_latent`` → image (B, 8h, 8w, 3), unclamped."""
    w = nn.Scope(weights, "decoder.")
    x = _conv(w, "conv_in", np.asarray(z, dtype), padding=1)
    trace.record("vae.decoder.conv_in", x)
    x = _mid(w, config, x, "vae.decoder")
    stages = len(config.decoder_num_filters)
    for i in range(stages):
        # Stability numbers the decoder stages by resolution: up.{stages-1} runs first, at the lowest.
        up = f"up.{stages - 1 - i}."
        for j in range(config.decoder_num_blocks[i]):
            x = _resnet(nn.Scope(w, f"{up}block.{j}."), config, x)
        if i < stages - 1:
            x = _conv(w, up + "upsample.conv", x, padding=1, upsample=2)  # nearest 2× first
        trace.record(f"vae.decoder.stages.{i}", x)  # numbered in execution order, as diffusers' up_blocks
    x = _conv(w, "conv_out", _norm_silu(w, "norm_out", config, x, out=x), padding=1)
    trace.record("vae.decoder.out", x)
    return x


def to_latent(z, config: VAEConfig):
    """VAE latent → diffusion latent: (z - shift)·scale."""
    z = (z - config.shift) * config.scale
    trace.record("vae.to_latent", z)
    return z


def from_latent(z, config: VAEConfig):
    """Diffusion latent → VAE latent: z/scale + shift (the inverse; order matters)."""
    z = z / config.scale + config.shift
    trace.record("vae.from_latent", z)
    return z
