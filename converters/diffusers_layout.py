"""diffusers ``StableDiffusion3Pipeline`` folders (``save_pretrained``) <-> canonical names.

Source names are ``<subfolder>/<tensor name>``. The transforms are diffusers' own single-file
conversion run backwards (``single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers`` and
``convert_ldm_vae_checkpoint``): fused qkv, (scale, shift) halves, LDM decoder order, 1x1 convs.
"""

from __future__ import annotations

from sd3ref.config import SD3Config

from .canonical import PREFIX
from .rules import COPY, FUSE_QKV, SWAP_HALVES, UNSQUEEZE, Rule

SUBFOLDERS = {"mmdit": "transformer", "vae": "vae", "clip_l": "text_encoder", "clip_g": "text_encoder_2",
              "t5": "text_encoder_3"}
WEIGHT_FILES = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model", "text_encoder_3": "model"}

# Tensors transformers may save that carry no weights of their own.
KNOWN_EXTRAS = {
    "text_encoder/text_model.embeddings.position_ids": "CLIP position ids (a buffer: arange)",
    "text_encoder_2/text_model.embeddings.position_ids": "CLIP position ids (a buffer: arange)",
    "text_encoder_3/encoder.embed_tokens.weight": "T5 encoder.embed_tokens (tied to shared.weight)",
}


def _linear(rules: list, canonical: str, source: str, op=COPY, bias: bool = True):
    rules.append(Rule(canonical + ".weight", (source + ".weight",), op))
    if bias:
        rules.append(Rule(canonical + ".bias", (source + ".bias",), op))


def _fused(rules: list, canonical: str, sources: tuple):
    for part in ("weight", "bias"):
        rules.append(Rule(f"{canonical}.{part}", tuple(f"{s}.{part}" for s in sources), FUSE_QKV))


def _mmdit(cfg: SD3Config) -> list[Rule]:
    p, s, r = PREFIX["mmdit"], "transformer/", []
    r.append(Rule(p + "pos_embed", (s + "pos_embed.pos_embed",)))
    _linear(r, p + "x_embedder.proj", s + "pos_embed.proj")
    _linear(r, p + "t_embedder.mlp.0", s + "time_text_embed.timestep_embedder.linear_1")
    _linear(r, p + "t_embedder.mlp.2", s + "time_text_embed.timestep_embedder.linear_2")
    _linear(r, p + "y_embedder.mlp.0", s + "time_text_embed.text_embedder.linear_1")
    _linear(r, p + "y_embedder.mlp.2", s + "time_text_embed.text_embedder.linear_2")
    _linear(r, p + "context_embedder", s + "context_embedder")
    n = cfg.mmdit_num_layers
    for i in range(n):
        x, c, d = f"{p}joint_blocks.{i}.x_block.", f"{p}joint_blocks.{i}.context_block.", f"{s}transformer_blocks.{i}."
        last = i == n - 1
        _linear(r, x + "adaLN_modulation.1", d + "norm1.linear")
        # The last context norm is AdaLayerNormContinuous in diffusers: (scale, shift) order.
        _linear(r, c + "adaLN_modulation.1", d + "norm1_context.linear", SWAP_HALVES if last else COPY)
        _fused(r, x + "attn.qkv", tuple(d + f"attn.to_{q}" for q in "qkv"))
        _fused(r, c + "attn.qkv", tuple(d + f"attn.add_{q}_proj" for q in "qkv"))
        _linear(r, x + "attn.proj", d + "attn.to_out.0")
        if cfg.mmdit_qk_norm:
            for q in "qk":
                r.append(Rule(f"{x}attn.ln_{q}.weight", (f"{d}attn.norm_{q}.weight",)))
                r.append(Rule(f"{c}attn.ln_{q}.weight", (f"{d}attn.norm_added_{q}.weight",)))
        if i in cfg.mmdit_dual_attention_indices:
            _fused(r, x + "attn2.qkv", tuple(d + f"attn2.to_{q}" for q in "qkv"))
            _linear(r, x + "attn2.proj", d + "attn2.to_out.0")
            if cfg.mmdit_qk_norm:
                for q in "qk":
                    r.append(Rule(f"{x}attn2.ln_{q}.weight", (f"{d}attn2.norm_{q}.weight",)))
        _linear(r, x + "mlp.fc1", d + "ff.net.0.proj")
        _linear(r, x + "mlp.fc2", d + "ff.net.2")
        if not last:
            _linear(r, c + "attn.proj", d + "attn.to_add_out")
            _linear(r, c + "mlp.fc1", d + "ff_context.net.0.proj")
            _linear(r, c + "mlp.fc2", d + "ff_context.net.2")
    _linear(r, p + "final_layer.adaLN_modulation.1", s + "norm_out.linear", SWAP_HALVES)
    _linear(r, p + "final_layer.linear", s + "proj_out")
    return r


def _resnet(r: list, c: str, d: str, has_shortcut: bool):
    for part in ("norm1", "conv1", "norm2", "conv2"):
        _linear(r, f"{c}.{part}", f"{d}.{part}")
    if has_shortcut:
        _linear(r, c + ".nin_shortcut", d + ".conv_shortcut")


def _vae_mid(r: list, c: str, d: str):
    _resnet(r, c + "mid.block_1", d + "mid_block.resnets.0", False)
    _resnet(r, c + "mid.block_2", d + "mid_block.resnets.1", False)
    a = d + "mid_block.attentions.0."
    _linear(r, c + "mid.attn_1.norm", a + "group_norm")
    for ldm, hf in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        r.append(Rule(f"{c}mid.attn_1.{ldm}.weight", (f"{a}{hf}.weight",), UNSQUEEZE))
        r.append(Rule(f"{c}mid.attn_1.{ldm}.bias", (f"{a}{hf}.bias",)))


def _vae(cfg: SD3Config) -> list[Rule]:
    v, p, r = cfg.vae, PREFIX["vae"], []
    for side, filters, blocks in (("encoder", v.encoder_num_filters, v.encoder_num_blocks),
                                  ("decoder", v.decoder_num_filters, v.decoder_num_blocks)):
        c, d, n = f"{p}{side}.", f"vae/{side}.", len(filters)
        for name in ("conv_in", "conv_out"):
            _linear(r, c + name, d + name)
        _linear(r, c + "norm_out", d + "conv_norm_out")
        _vae_mid(r, c, d)
        for i in range(n):
            # diffusers numbers decoder levels in execution order, LDM from the output end.
            level = f"{c}down.{i}" if side == "encoder" else f"{c}up.{n - 1 - i}"
            hf = f"{d}down_blocks.{i}" if side == "encoder" else f"{d}up_blocks.{i}"
            for j in range(blocks[i]):
                _resnet(r, f"{level}.block.{j}", f"{hf}.resnets.{j}", j == 0 and i > 0 and filters[i - 1] != filters[i])
            if i < n - 1:
                kind = "downsample" if side == "encoder" else "upsample"
                _linear(r, f"{level}.{kind}.conv", f"{hf}.{kind}rs.0.conv")
    return r


def _prefixed(names: list[str], canonical_prefix: str, folder: str) -> list[Rule]:
    return [Rule(canonical_prefix + n, (f"{folder}/{n}",)) for n in names]


def _text(cfg: SD3Config, comp: str) -> list[Rule]:
    """Text encoders use HF names in both forms: only the prefix changes."""
    from .canonical import component_shapes

    prefix = PREFIX[comp]
    names = [k[len(prefix):] for k in component_shapes(cfg, comp)]
    return _prefixed(names, prefix, SUBFOLDERS[comp])


def rules(cfg: SD3Config, comp: str) -> list[Rule]:
    if comp == "mmdit":
        return _mmdit(cfg)
    if comp == "vae":
        return _vae(cfg)
    return _text(cfg, comp)
