"""The canonical layout: Stability's single-file names and PyTorch shapes, as functions of the config.

This module is the one definition of *what* a complete model holds. The per-format layout modules
(``keras_layout``, ``diffusers_layout``, ``sai_layout``) say *where* each canonical tensor comes from.
"""

from __future__ import annotations

from sd3ref.config import CLIPConfig, SD3Config, T5Config, VAEConfig

FORMAT = "canonical-1"
COMPONENTS = ("mmdit", "vae", "clip_l", "clip_g", "t5")
PREFIX = {
    "mmdit": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}
# Stability's CLIP-L files have no projection (it is the identity); KerasHub and diffusers always hold
# one. It is canonical when the source has it, and must then be kept: it changes the pooled vector.
CLIP_L_PROJECTION = PREFIX["clip_l"] + "text_projection.weight"
OPTIONAL = frozenset({CLIP_L_PROJECTION})


def component_of(name: str) -> str | None:
    for comp, prefix in PREFIX.items():
        if name.startswith(prefix):
            return comp
    return None


def present_components(cfg: SD3Config) -> list[str]:
    return ["mmdit"] + [c for c in COMPONENTS[1:] if getattr(cfg, c) is not None]


def _linear(d: dict, name: str, out: int, inp: int, bias: bool = True) -> None:
    d[name + ".weight"] = (out, inp)
    if bias:
        d[name + ".bias"] = (out,)


def mmdit_shapes(cfg: SD3Config) -> dict[str, tuple]:
    p = PREFIX["mmdit"]
    h, hd, n = cfg.mmdit_hidden_dim, cfg.mmdit_head_dim, cfg.mmdit_num_layers
    mlp = int(h * cfg.mmdit_mlp_ratio)
    d = {p + "pos_embed": (1, cfg.mmdit_position_size**2, h),
         p + "x_embedder.proj.weight": (h, cfg.latent_channels, cfg.mmdit_patch_size, cfg.mmdit_patch_size),
         p + "x_embedder.proj.bias": (h,)}
    _linear(d, p + "t_embedder.mlp.0", h, 256)  # 256 = sinusoidal frequency features
    _linear(d, p + "t_embedder.mlp.2", h, h)
    _linear(d, p + "y_embedder.mlp.0", h, cfg.mmdit_pooled_dim)
    _linear(d, p + "y_embedder.mlp.2", h, h)
    _linear(d, p + "context_embedder", h, cfg.mmdit_context_dim)
    for i in range(n):
        for stream in ("x_block", "context_block"):
            b = f"{p}joint_blocks.{i}.{stream}."
            pre_only = stream == "context_block" and i == n - 1  # last context block: no attn out / MLP
            dual = stream == "x_block" and i in cfg.mmdit_dual_attention_indices
            _linear(d, b + "adaLN_modulation.1", (2 if pre_only else 9 if dual else 6) * h, h)
            for attn in ("attn", "attn2") if dual else ("attn",):
                _linear(d, f"{b}{attn}.qkv", 3 * h, h)
                if cfg.mmdit_qk_norm:
                    d[f"{b}{attn}.ln_q.weight"] = (hd,)
                    d[f"{b}{attn}.ln_k.weight"] = (hd,)
                if not pre_only:
                    _linear(d, f"{b}{attn}.proj", h, h)
            if not pre_only:
                _linear(d, b + "mlp.fc1", mlp, h)
                _linear(d, b + "mlp.fc2", h, mlp)
    _linear(d, p + "final_layer.adaLN_modulation.1", 2 * h, h)
    _linear(d, p + "final_layer.linear", cfg.mmdit_patch_size**2 * cfg.latent_channels, h)
    return d


def _norm(d: dict, name: str, c: int) -> None:
    d[name + ".weight"], d[name + ".bias"] = (c,), (c,)


def _conv(d: dict, name: str, out: int, inp: int, k: int = 3) -> None:
    d[name + ".weight"], d[name + ".bias"] = (out, inp, k, k), (out,)


def _resnet(d: dict, name: str, inp: int, out: int) -> None:
    _norm(d, name + ".norm1", inp)
    _conv(d, name + ".conv1", out, inp)
    _norm(d, name + ".norm2", out)
    _conv(d, name + ".conv2", out, out)
    if inp != out:
        _conv(d, name + ".nin_shortcut", out, inp, 1)


def _mid(d: dict, name: str, c: int) -> None:
    _resnet(d, name + ".mid.block_1", c, c)
    _norm(d, name + ".mid.attn_1.norm", c)
    for proj in ("q", "k", "v", "proj_out"):
        _conv(d, f"{name}.mid.attn_1.{proj}", c, c, 1)  # 1x1 convolutions, 4-D as in LDM
    _resnet(d, name + ".mid.block_2", c, c)


def vae_level_channels(filters: tuple) -> list[tuple[int, int]]:
    """(input, output) channels of each level: a level's first block changes the channel count."""
    return [(filters[max(i - 1, 0)], f) for i, f in enumerate(filters)]


def vae_shapes(v: VAEConfig) -> dict[str, tuple]:
    p = PREFIX["vae"]
    d = {}
    enc, dec = v.encoder_num_filters, v.decoder_num_filters
    _conv(d, p + "encoder.conv_in", enc[0], v.input_channels)
    for i, (cin, cout) in enumerate(vae_level_channels(enc)):
        for j in range(v.encoder_num_blocks[i]):
            _resnet(d, f"{p}encoder.down.{i}.block.{j}", cin if j == 0 else cout, cout)
        if i < len(enc) - 1:
            _conv(d, f"{p}encoder.down.{i}.downsample.conv", cout, cout)
    _mid(d, p + "encoder", enc[-1])
    _norm(d, p + "encoder.norm_out", enc[-1])
    _conv(d, p + "encoder.conv_out", v.sample_channels, enc[-1])
    _conv(d, p + "decoder.conv_in", dec[0], v.latent_channels)
    _mid(d, p + "decoder", dec[0])
    n = len(dec)
    for i, (cin, cout) in enumerate(vae_level_channels(dec)):  # i counts in execution order
        up = f"{p}decoder.up.{n - 1 - i}"  # LDM numbers decoder levels from the output end
        for j in range(v.decoder_num_blocks[i]):
            _resnet(d, f"{up}.block.{j}", cin if j == 0 else cout, cout)
        if i < n - 1:
            _conv(d, f"{up}.upsample.conv", cout, cout)
    _norm(d, p + "decoder.norm_out", dec[-1])
    _conv(d, p + "decoder.conv_out", v.output_channels, dec[-1])
    return d


def clip_shapes(c: CLIPConfig, prefix: str) -> dict[str, tuple]:
    t = prefix + "text_model."
    h = c.hidden_dim
    d = {t + "embeddings.token_embedding.weight": (c.vocabulary_size, h),
         t + "embeddings.position_embedding.weight": (c.max_sequence_length, h)}
    for i in range(c.num_layers):
        b = f"{t}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(d, b + "self_attn." + proj, h, h)
        _norm(d, b + "layer_norm1", h)
        _linear(d, b + "mlp.fc1", c.intermediate_dim, h)
        _linear(d, b + "mlp.fc2", h, c.intermediate_dim)
        _norm(d, b + "layer_norm2", h)
    _norm(d, t + "final_layer_norm", h)
    d[prefix + "text_projection.weight"] = (h, h)
    return d


def t5_shapes(c: T5Config) -> dict[str, tuple]:
    p = PREFIX["t5"]
    inner = c.num_heads * c.key_value_dim
    d = {p + "shared.weight": (c.vocabulary_size, c.hidden_dim)}
    for i in range(c.num_layers):
        b = f"{p}encoder.block.{i}.layer."
        for proj in ("q", "k", "v"):
            d[f"{b}0.SelfAttention.{proj}.weight"] = (inner, c.hidden_dim)
        d[f"{b}0.SelfAttention.o.weight"] = (c.hidden_dim, inner)
        if i == 0:  # T5 shares layer 0's relative position bias with all layers
            d[f"{b}0.SelfAttention.relative_attention_bias.weight"] = (c.relative_attention_num_buckets, c.num_heads)
        d[f"{b}0.layer_norm.weight"] = (c.hidden_dim,)
        d[f"{b}1.DenseReluDense.wi_0.weight"] = (c.intermediate_dim, c.hidden_dim)
        d[f"{b}1.DenseReluDense.wi_1.weight"] = (c.intermediate_dim, c.hidden_dim)
        d[f"{b}1.DenseReluDense.wo.weight"] = (c.hidden_dim, c.intermediate_dim)
        d[f"{b}1.layer_norm.weight"] = (c.hidden_dim,)
    d[p + "encoder.final_layer_norm.weight"] = (c.hidden_dim,)
    return d


def component_shapes(cfg: SD3Config, comp: str) -> dict[str, tuple]:
    """Every canonical tensor of one component (optional ones included) and its shape."""
    if comp == "mmdit":
        return mmdit_shapes(cfg)
    if comp == "vae":
        return vae_shapes(cfg.vae)
    if comp in ("clip_l", "clip_g"):
        return clip_shapes(getattr(cfg, comp), PREFIX[comp])
    return t5_shapes(cfg.t5)


def expected_shapes(cfg: SD3Config) -> dict[str, tuple]:
    out = {}
    for comp in present_components(cfg):
        out.update(component_shapes(cfg, comp))
    return out
