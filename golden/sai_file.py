"""Stability single-file form of a golden set, written from the diffusers pipeline's tensors and then
validated by loading it back with diffusers' OWN single-file loader (`from_single_file`).

This reverse mapping belongs to the fixture generator on purpose: it is independent of sd3ref's
converters, which are tested against its output."""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

MMDIT, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, CLIP_G, T5 = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                      "text_encoders.t5xxl.transformer.")

_MMDIT_RENAMES = [
    (r"pos_embed\.pos_embed", "pos_embed"),
    (r"pos_embed\.proj\.", "x_embedder.proj."),
    (r"time_text_embed\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
    (r"time_text_embed\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
    (r"time_text_embed\.text_embedder\.linear_1\.", "y_embedder.mlp.0."),
    (r"time_text_embed\.text_embedder\.linear_2\.", "y_embedder.mlp.2."),
    (r"context_embedder\.", "context_embedder."),
    (r"norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
    (r"proj_out\.", "final_layer.linear."),
]
_BLOCK_RENAMES = [
    (r"norm1\.linear\.", "x_block.adaLN_modulation.1."),
    (r"norm1_context\.linear\.", "context_block.adaLN_modulation.1."),
    (r"attn\.to_out\.0\.", "x_block.attn.proj."),
    (r"attn\.to_add_out\.", "context_block.attn.proj."),
    (r"attn\.norm_q\.", "x_block.attn.ln_q."),
    (r"attn\.norm_k\.", "x_block.attn.ln_k."),
    (r"attn\.norm_added_q\.", "context_block.attn.ln_q."),
    (r"attn\.norm_added_k\.", "context_block.attn.ln_k."),
    (r"attn2\.to_out\.0\.", "x_block.attn2.proj."),
    (r"attn2\.norm_q\.", "x_block.attn2.ln_q."),
    (r"attn2\.norm_k\.", "x_block.attn2.ln_k."),
    (r"ff\.net\.0\.proj\.", "x_block.mlp.fc1."),
    (r"ff\.net\.2\.", "x_block.mlp.fc2."),
    (r"ff_context\.net\.0\.proj\.", "context_block.mlp.fc1."),
    (r"ff_context\.net\.2\.", "context_block.mlp.fc2."),
]
_QKV = {"attn.to_": "x_block.attn.qkv.", "attn.add_": "context_block.attn.qkv.", "attn2.to_": "x_block.attn2.qkv."}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    # diffusers' AdaLayerNormContinuous chunks (scale, shift); Stability's layout is (shift, scale).
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def mmdit_tensors(sd: dict, num_layers: int) -> dict:
    out, used = {}, set()
    for i in range(num_layers):
        p = f"transformer_blocks.{i}."
        for src, dst in _QKV.items():
            for kind in ("weight", "bias"):
                names = [f"{p}{src}{n}.{kind}" for n in (("q", "k", "v") if src.endswith("to_") else
                                                          ("q_proj", "k_proj", "v_proj"))]
                if names[0] in sd:
                    out[f"joint_blocks.{i}.{dst}{kind}"] = torch.cat([sd[n] for n in names], 0)
                    used.update(names)
    for key, t in sd.items():
        if key in used:
            continue
        m = re.match(r"transformer_blocks\.(\d+)\.(.*)", key)
        table, rest, head = (_BLOCK_RENAMES, m.group(2), f"joint_blocks.{m.group(1)}.") if m else (_MMDIT_RENAMES, key, "")
        for pattern, repl in table:
            if re.match(pattern, rest):
                name = head + re.sub("^" + pattern, repl, rest)
                break
        else:
            raise KeyError(f"unmapped diffusers transformer tensor {key}")
        last_context = m and int(m.group(1)) == num_layers - 1 and rest.startswith("norm1_context.")
        out[name] = _swap_halves(t) if (last_context or key.startswith("norm_out.")) else t
    return {MMDIT + k: v for k, v in out.items()}


def vae_tensors(sd: dict, num_levels: int) -> dict:
    out = {}
    for key, t in sd.items():
        name = key
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(.*)", key)
        if m:  # diffusers runs up_blocks.0 first; Stability numbers the lowest resolution last-built up.3
            name = f"decoder.up.{num_levels - 1 - int(m.group(1))}.{m.group(2)}"
        for pattern, repl in [(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
                              (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
                              (r"(up\.\d+)\.resnets\.", r"\1.block."),
                              (r"(up\.\d+)\.upsamplers\.0\.", r"\1.upsample."),
                              (r"mid_block\.resnets\.0\.", "mid.block_1."), (r"mid_block\.resnets\.1\.", "mid.block_2."),
                              (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
                              (r"mid_block\.attentions\.0\.to_q\.", "mid.attn_1.q."),
                              (r"mid_block\.attentions\.0\.to_k\.", "mid.attn_1.k."),
                              (r"mid_block\.attentions\.0\.to_v\.", "mid.attn_1.v."),
                              (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
                              (r"conv_shortcut\.", "nin_shortcut."), (r"conv_norm_out\.", "norm_out.")]:
            name = re.sub(pattern, repl, name)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name):
            t = t[:, :, None, None]  # Stability stores the attention projections as 1×1 convolutions
        out[VAE + name] = t
    return out


def tensors_from_pipeline(pipe, num_mmdit_layers: int) -> dict:
    out = mmdit_tensors(pipe.transformer.state_dict(), num_mmdit_layers)
    out.update(vae_tensors(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    out.update({CLIP_L + k: v for k, v in pipe.text_encoder.state_dict().items()})
    out.update({CLIP_G + k: v for k, v in pipe.text_encoder_2.state_dict().items()})
    if pipe.text_encoder_3 is not None:
        # encoder.embed_tokens is tied to shared: Stability files hold the table once, as shared.weight.
        out.update({T5 + k: v for k, v in pipe.text_encoder_3.state_dict().items() if k != "encoder.embed_tokens.weight"})
    return out


def write(pipe, num_mmdit_layers: int, path: str, storage: dict) -> int:
    """Each component in its stored dtype (golden.sets storage), as Stability's files are."""
    prefixes = {MMDIT: "mmdit", VAE: "vae", CLIP_L: "clip", CLIP_G: "clip", T5: "t5"}
    tensors = {}
    for k, v in tensors_from_pipeline(pipe, num_mmdit_layers).items():
        part = next(part for prefix, part in prefixes.items() if k.startswith(prefix))
        tensors[k] = v.detach().to(getattr(torch, storage[part])).contiguous()
    save_file(tensors, path)
    return len(tensors)
