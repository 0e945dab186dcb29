"""KerasHub ``StableDiffusion3Backbone`` weights (``model.weights.h5``) <-> canonical names.

Keras 3 saves the object tree, not layer names: a functional model's layers go under
``layers/<snake_case(ClassName)>[_N]``, attributes under their attribute name, each layer's variables
as datasets ``<path>/vars/<i>`` in creation order (kernel 0, bias 1; gamma 0, beta 1), and the
``vars`` group carries the layer's ``name`` attribute (Keras >= 3.6). Paths here are dataset paths
without the leading '/'. See docs/canonical_layout.md; tests/data holds the real SD3-medium and SD3.5-medium files' paths and shapes.
"""

from __future__ import annotations

from sd3ref.config import SD3Config

from .canonical import PREFIX
from .rules import ADD_BATCH, CONV, COPY, TRANSPOSE, Rule, heads_bias, heads_in, heads_out

# CLIP blocks were `CLIPEncoderBlock` up to keras-hub 0.21 and `CLIPEncoderLayer` since; the trees
# below the block are the same. Readers rename the old form to the new one.
OLD_CLIP_BLOCK, CLIP_BLOCK = "/clip_encoder_block", "/clip_encoder_layer"

# Untied T5 embeddings carry an output projection (vars/1) that an encoder never uses. A tied T5
# (KerasHub's default, and what we write) has none.
T5_REVERSE_EMBEDDING = "layers/t5_encoder/layers/reversible_embedding/vars/1"
KNOWN_EXTRAS = {T5_REVERSE_EMBEDDING: "unused T5 output embedding (reverse_embeddings)"}


def normalise_path(path: str) -> str:
    return path.replace(OLD_CLIP_BLOCK, CLIP_BLOCK)


def _nth(base: str, i: int) -> str:
    """Keras' container naming: the first of a class is bare, later ones get _1, _2, ..."""
    return base if i == 0 else f"{base}_{i}"


class _Table:
    """Collects rules and the ``name`` attribute of each ``vars`` group they touch."""

    def __init__(self):
        self.rules: list[Rule] = []
        self.names: dict[str, str] = {}

    def add(self, canonical: str, group: str, index: int, op=COPY, name: str | None = None):
        self.rules.append(Rule(canonical, (f"{group}/vars/{index}",), op))
        self.names[group + "/vars"] = name or group.rsplit("/", 1)[-1]

    def dense(self, canonical: str, group: str, bias: bool = True, name: str | None = None):
        self.add(canonical + ".weight", group, 0, TRANSPOSE, name)
        if bias:
            self.add(canonical + ".bias", group, 1, COPY, name)

    def conv(self, canonical: str, group: str, name: str | None = None):
        self.add(canonical + ".weight", group, 0, CONV, name)
        self.add(canonical + ".bias", group, 1, COPY, name)

    def norm(self, canonical: str, group: str, name: str | None = None):
        self.add(canonical + ".weight", group, 0, COPY, name)
        self.add(canonical + ".bias", group, 1, COPY, name)


def _mmdit(t: _Table, cfg: SD3Config):
    p, k = PREFIX["mmdit"], "layers/mm_di_t/layers/"
    t.conv(p + "x_embedder.proj", k + "patch_embedding/patch_embedding")
    t.add(p + "pos_embed", k + "adjustable_position_embedding", 0, ADD_BATCH, "position_embedding")
    t.dense(p + "context_embedder", k + "dense", name="context_embedding")
    t.dense(p + "y_embedder.mlp.0", k + "mlp/dense1")
    t.dense(p + "y_embedder.mlp.2", k + "mlp/dense2")
    t.dense(p + "t_embedder.mlp.0", k + "timestep_embedding/mlp/dense1")
    t.dense(p + "t_embedder.mlp.2", k + "timestep_embedding/mlp/dense2")
    n = cfg.mmdit_num_layers
    for i in range(n):
        for stream in ("x_block", "context_block"):
            c, g = f"{p}joint_blocks.{i}.{stream}.", f"{k}{_nth('mm_di_t_block', i)}/{stream}/"
            pre_only = stream == "context_block" and i == n - 1
            dual = stream == "x_block" and i in cfg.mmdit_dual_attention_indices
            # adaLN chunk order is Stability's in KerasHub too, also for the (shift, scale) pair.
            t.dense(c + "adaLN_modulation.1", g + "ada_layer_norm/dense")
            for attn, suffix in (("attn", ""), ("attn2", "2"))[: 2 if dual else 1]:
                t.dense(f"{c}{attn}.qkv", g + "attention_qkv" + suffix)
                if cfg.mmdit_qk_norm:
                    t.add(f"{c}{attn}.ln_q.weight", g + "q_norm" + suffix, 0)
                    t.add(f"{c}{attn}.ln_k.weight", g + "k_norm" + suffix, 0)
                if not pre_only:
                    t.dense(f"{c}{attn}.proj", g + "attention_proj" + suffix)
            if not pre_only:
                t.dense(c + "mlp.fc1", g + "mlp/dense1")
                t.dense(c + "mlp.fc2", g + "mlp/dense2")
    t.dense(p + "final_layer.adaLN_modulation.1", k + "adaptive_layer_normalization/dense")
    t.dense(p + "final_layer.linear", k + "dense_1", name="output_dense")


def _resnet(t: _Table, c: str, g: str, has_shortcut: bool):
    for norm in ("norm1", "norm2"):
        t.norm(f"{c}.{norm}", f"{g}/{norm}")
    for conv in ("conv1", "conv2"):
        t.conv(f"{c}.{conv}", f"{g}/{conv}")
    if has_shortcut:
        t.conv(c + ".nin_shortcut", g + "/residual_projection")


def _vae_mid(t: _Table, c: str, g: str):
    _resnet(t, c + "mid.block_1", g + "mid_block_0", False)
    t.norm(c + "mid.attn_1.norm", g + "mid_attention/group_norm")
    for ldm, keras in (("q", "query"), ("k", "key"), ("v", "value"), ("proj_out", "output")):
        t.conv(f"{c}mid.attn_1.{ldm}", f"{g}mid_attention/{keras}_conv2d")  # 1x1: OIHW <-> HWIO too
    _resnet(t, c + "mid.block_2", g + "mid_block_1", False)


def _vae(t: _Table, cfg: SD3Config):
    v, p = cfg.vae, PREFIX["vae"]
    for side, filters, blocks in (("encoder", v.encoder_num_filters, v.encoder_num_blocks),
                                  ("decoder", v.decoder_num_filters, v.decoder_num_blocks)):
        c, g, n = f"{p}{side}.", f"layers/vae_{side}/", len(filters)
        t.conv(c + "conv_in", g + "input_projection")
        if side == "decoder":
            _vae_mid(t, c, g)
        flat = 0  # KerasHub numbers ResNet blocks across levels
        for i in range(n):
            level = f"{c}down.{i}" if side == "encoder" else f"{c}up.{n - 1 - i}"  # LDM decoder order
            for j in range(blocks[i]):
                shortcut = j == 0 and i > 0 and filters[i - 1] != filters[i]
                _resnet(t, f"{level}.block.{j}", g + "blocks/" + _nth("res_net_block", flat), shortcut)
                flat += 1
            if i < n - 1:
                kind = "downsample" if side == "encoder" else "upsample"
                t.conv(f"{level}.{kind}.conv", f"{g}{kind}s/{_nth('conv2d', i)}", name=f"{kind}_{i}_conv")
        if side == "encoder":
            _vae_mid(t, c, g)
        t.norm(c + "norm_out", g + "output_norm")
        t.conv(c + "conv_out", g + "output_projection")


def _clip(t: _Table, cfg: SD3Config, comp: str):
    c = cfg.clip_l if comp == "clip_l" else cfg.clip_g
    p = PREFIX[comp]
    tm = p + "text_model."
    # Functional-graph order: clip_l is built first, so it is the unsuffixed one.
    g = "layers/clip_text_encoder/layers/" if comp == "clip_l" else "layers/clip_text_encoder_1/layers/"
    t.add(tm + "embeddings.token_embedding.weight", g + "token_and_position_embedding/token_embedding", 0)
    t.add(tm + "embeddings.position_embedding.weight", g + "token_and_position_embedding/position_embedding", 0)
    for i in range(c.num_layers):
        b, k = f"{tm}encoder.layers.{i}.", g + _nth("clip_encoder_layer", i) + "/"
        for hf, keras, name in (("q_proj", "query", "query"), ("k_proj", "key", "key"), ("v_proj", "value", "value")):
            t.add(f"{b}self_attn.{hf}.weight", f"{k}attention/{keras}_dense", 0, heads_in(c.num_heads), name)
            t.add(f"{b}self_attn.{hf}.bias", f"{k}attention/{keras}_dense", 1, heads_bias(c.num_heads), name)
        t.add(b + "self_attn.out_proj.weight", k + "attention/output_dense", 0, heads_out(c.num_heads), "attention_output")
        t.add(b + "self_attn.out_proj.bias", k + "attention/output_dense", 1, COPY, "attention_output")
        t.norm(b + "layer_norm1", k + "layer_norm_1")
        t.norm(b + "layer_norm2", k + "layer_norm_2")
        t.dense(b + "mlp.fc1", k + "dense_1")
        t.dense(b + "mlp.fc2", k + "dense_2")
    t.norm(tm + "final_layer_norm", g + "layer_normalization", name=f"{comp}_layer_norm")
    proj = "layers/clip_projection" if comp == "clip_l" else "layers/clip_projection_1"
    t.dense(p + "text_projection", proj + "/dense", bias=False)


def _t5(t: _Table, cfg: SD3Config):
    c, p, g = cfg.t5, PREFIX["t5"], "layers/t5_encoder/layers/"
    t.add(p + "shared.weight", g + "reversible_embedding", 0, COPY, "token_embedding")
    for i in range(c.num_layers):
        b, k = f"{p}encoder.block.{i}.layer.", g + _nth("t5_transformer_layer", i) + "/"
        for hf, keras in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "output")):
            t.dense(f"{b}0.SelfAttention.{hf}", f"{k}self_attention/{keras}_projector", bias=False)
        if i == 0:
            t.add(b + "0.SelfAttention.relative_attention_bias.weight", k + "self_attention", 0)
        # The T5LayerNorms are auto-named in creation order: two per layer.
        t.add(b + "0.layer_norm.weight", k + "self_attention_layer_norm", 0, COPY, _nth("t5_layer_norm", 2 * i))
        # input_projector carries the activation: HF's wi_0 branch; gate_projector is wi_1.
        t.dense(b + "1.DenseReluDense.wi_0", k + "input_projector", bias=False)
        t.dense(b + "1.DenseReluDense.wi_1", k + "gate_projector", bias=False)
        t.dense(b + "1.DenseReluDense.wo", k + "output_projector", bias=False)
        t.add(b + "1.layer_norm.weight", k + "layer_norm", 0, COPY, _nth("t5_layer_norm", 2 * i + 1))
    t.add(p + "encoder.final_layer_norm.weight", g + "t5_layer_norm", 0, COPY, "encoder_output_layer_norm")


_BUILDERS = {"mmdit": _mmdit, "vae": _vae, "clip_l": lambda t, c: _clip(t, c, "clip_l"),
             "clip_g": lambda t, c: _clip(t, c, "clip_g"), "t5": _t5}


def table(cfg: SD3Config, comp: str) -> _Table:
    t = _Table()
    _BUILDERS[comp](t, cfg)
    return t


def rules(cfg: SD3Config, comp: str) -> list[Rule]:
    return table(cfg, comp).rules


