"""Model configuration.

Field names mirror KerasHub's ``StableDiffusion3Backbone`` config (and its nested ``VAEBackbone``,
``CLIPTextEncoder`` and ``T5Encoder`` configs), so a KerasHub ``config.json`` maps onto it one to one.
Values that KerasHub hard-codes but other frameworks make configurable (CLIP final-LN epsilon,
T5 GELU variant) are explicit fields: they are conventions, not constants.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration that cannot describe an SD3 model."""


def _check_types(config) -> None:
    """Every int field an integer, every float field a number: config files are JSON that anyone can edit,
    and a string "3" or a null would otherwise surface as a TypeError deep inside a converter."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), f.type if isinstance(f.type, str) else f.type.__name__
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if kind == "int" and not (number and isinstance(value, numbers.Integral)):
            raise ConfigError(f"{type(config).__name__}.{f.name} {value!r} is not an integer")
        if kind == "float" and not number:
            raise ConfigError(f"{type(config).__name__}.{f.name} {value!r} is not a number")
        if kind == "Optional[int]" and value is not None and not (number and isinstance(value, numbers.Integral)):
            raise ConfigError(f"{type(config).__name__}.{f.name} {value!r} is not an integer or null")
        if kind == "tuple":
            try:
                object.__setattr__(config, f.name, tuple(_integer(v) for v in value or ()))
            except (TypeError, ValueError):
                raise ConfigError(f"{type(config).__name__}.{f.name} {value!r} is not a list of integers") from None


def _integer(v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(v)
    return int(v)


@dataclass(frozen=True)
class CLIPConfig:
    vocabulary_size: int
    hidden_dim: int
    num_layers: int
    num_heads: int
    intermediate_dim: int
    intermediate_activation: str  # "quick_gelu" (CLIP-L) | "gelu" (exact erf, CLIP-G)
    # Block whose output is the token context: num_layers - 2, the penultimate block (HF hidden_states[-2]).
    intermediate_output_index: int
    max_sequence_length: int = 77
    layer_norm_epsilon: float = 1e-5
    # KerasHub's final LayerNorm uses 1e-6; HF / Stability use 1e-5. Only the pooled vector sees it.
    final_layer_norm_epsilon: float = 1e-5
    # Where the pooled vector is read: None = the largest id of the row (KerasHub, Stability, and HF configs
    # with the legacy eos_token_id 2); an id = its first occurrence, position 0 when absent (HF otherwise).
    # The same position whenever the row's EOS is its largest id, as in the real CLIP vocabularies.
    eos_token_id: Optional[int] = None

    def __post_init__(self):
        _check_types(self)
        if self.intermediate_activation not in ("quick_gelu", "gelu"):
            raise ConfigError(f"CLIP intermediate_activation {self.intermediate_activation!r} is not quick_gelu or gelu")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"CLIP hidden_dim {self.hidden_dim} is not a multiple of num_heads {self.num_heads}")
        if not 0 <= self.intermediate_output_index < self.num_layers:
            raise ConfigError(f"CLIP intermediate_output_index {self.intermediate_output_index} outside 0..{self.num_layers - 1}")


@dataclass(frozen=True)
class T5Config:
    vocabulary_size: int
    hidden_dim: int
    num_layers: int
    num_heads: int
    intermediate_dim: int
    key_value_dim: int
    # HF "gated-gelu" is the tanh approximation ("gelu_tanh"); KerasHub's T5 v1.1 presets use exact "gelu".
    activation: str = "gelu_tanh"
    layer_norm_epsilon: float = 1e-6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128

    def __post_init__(self):
        _check_types(self)
        if self.activation not in ("gelu_tanh", "gelu", "relu"):
            raise ConfigError(f"T5 activation {self.activation!r} is not gelu_tanh, gelu or relu")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            # the logarithmic bins would start past max_distance and index the bias table out of range
            raise ConfigError(f"T5 relative_attention_max_distance {self.relative_attention_max_distance} must exceed "
                              f"relative_attention_num_buckets // 4 = {self.relative_attention_num_buckets // 4}")


@dataclass(frozen=True)
class VAEConfig:
    encoder_num_filters: tuple = (128, 256, 512, 512)
    encoder_num_blocks: tuple = (2, 2, 2, 2)
    decoder_num_filters: tuple = (512, 512, 256, 128)
    decoder_num_blocks: tuple = (3, 3, 3, 3)
    input_channels: int = 3
    sample_channels: int = 32  # encoder output: mean and logvar of latent_channels each
    output_channels: int = 3
    scale: float = 1.5305
    shift: float = 0.0609
    num_groups: int = 32
    norm_epsilon: float = 1e-6
    # KerasHub's VAEBackbone: "sample" draws mean + std·ε when encoding an image, "mode" takes the mean.
    sampler_method: str = "sample"

    def __post_init__(self):
        _check_types(self)  # a null shift_factor (diffusers' AutoencoderKL default, SD1-style VAEs) stops here
        if self.sampler_method not in ("sample", "mode"):
            raise ConfigError(f"VAE sampler_method {self.sampler_method!r} is not 'sample' or 'mode'")
        for f in self.encoder_num_filters + self.decoder_num_filters:
            if f % self.num_groups:
                raise ConfigError(f"VAE filter count {f} is not a multiple of {self.num_groups} GroupNorm groups")

    @property
    def latent_channels(self) -> int:
        return self.sample_channels // 2


@dataclass(frozen=True)
class SD3Config:
    mmdit_hidden_dim: int
    mmdit_num_layers: int
    mmdit_num_heads: int
    mmdit_position_size: int
    mmdit_patch_size: int = 2
    mmdit_qk_norm: Optional[str] = None  # None | "rms_norm"
    mmdit_dual_attention_indices: tuple = ()
    latent_channels: int = 16
    output_channels: int = 3
    num_train_timesteps: int = 1000
    shift: float = 3.0
    # Width of a context token: T5's hidden size, 4096 without T5 (KerasHub); CLIP features are zero-padded to it.
    mmdit_context_dim: int = 4096
    # clip_l.hidden_dim + clip_g.hidden_dim.
    mmdit_pooled_dim: int = 2048
    mmdit_mlp_ratio: float = 4.0
    image_shape: tuple = (1024, 1024, 3)
    vae: Optional[VAEConfig] = field(default_factory=VAEConfig)
    clip_l: Optional[CLIPConfig] = None
    clip_g: Optional[CLIPConfig] = None
    t5: Optional[T5Config] = None

    def __post_init__(self):
        _check_types(self)
        if self.mmdit_qk_norm not in (None, "rms_norm"):
            raise ConfigError(f"mmdit_qk_norm {self.mmdit_qk_norm!r} is not None or 'rms_norm'")
        if self.mmdit_hidden_dim % self.mmdit_num_heads:
            raise ConfigError(f"mmdit_hidden_dim {self.mmdit_hidden_dim} is not a multiple of mmdit_num_heads {self.mmdit_num_heads}")
        bad = [i for i in self.mmdit_dual_attention_indices if not 0 <= i < self.mmdit_num_layers]
        if bad:
            raise ConfigError(f"mmdit_dual_attention_indices {bad} outside 0..{self.mmdit_num_layers - 1}")

    @property
    def mmdit_head_dim(self) -> int:
        return self.mmdit_hidden_dim // self.mmdit_num_heads

    # -- serialisation (the canonical file's "sd3ref.config" metadata entry) --------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "SD3Config":
        d = dict(d)
        sub = {"vae": VAEConfig, "clip_l": CLIPConfig, "clip_g": CLIPConfig, "t5": T5Config}
        for key, sub_cls in sub.items():
            if d.get(key) is not None:
                d[key] = _build(sub_cls, d[key])
        return _build(cls, d)

    @classmethod
    def from_json(cls, text: str) -> "SD3Config":
        return cls.from_dict(json.loads(text))


def _build(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {unknown}")
    try:
        return cls(**d)
    except TypeError as e:  # a missing required field
        raise ConfigError(f"{cls.__name__}: {e}") from None


# -- KerasHub config.json ------------------------------------------------------------------------------

def _keras_inner(obj: Any) -> dict:
    """A serialized Keras object ({"class_name", "config", ...}) or an already-plain config dict."""
    if isinstance(obj, dict) and "config" in obj and "class_name" in obj:
        return obj["config"]
    return obj


# Activation names in KerasHub configs and transformers configs → sd3ref's; unknown names pass through
# (and fail the config's own check, naming them).
_ACTIVATION_NAMES = {"gelu_approximate": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _activation(name: str) -> str:
    return _ACTIVATION_NAMES.get(name, name)


def _keras_activation(value: Any) -> str:
    """KerasHub serializes activations as a name or as a registered-function object."""
    if isinstance(value, dict):
        value = value.get("config") or value.get("class_name")
        if isinstance(value, dict):
            value = value.get("name", "")
    name = str(value).split(">")[-1]
    return _activation(name)


def clip_from_keras(obj: Any) -> CLIPConfig:
    c = _keras_inner(obj)
    if c.get("embedding_dim", c["hidden_dim"]) != c["hidden_dim"]:
        raise ConfigError("CLIP embedding_dim != hidden_dim is not an SD3 text encoder")
    index = c.get("intermediate_output_index")
    if index is None:
        raise ConfigError("CLIP config has no intermediate_output_index: SD3 needs the penultimate block (-2)")
    if index < 0:
        index += c["num_layers"]
    return CLIPConfig(
        vocabulary_size=c["vocabulary_size"], hidden_dim=c["hidden_dim"], num_layers=c["num_layers"],
        num_heads=c["num_heads"], intermediate_dim=c["intermediate_dim"],
        intermediate_activation=_keras_activation(c.get("intermediate_activation", "quick_gelu")),
        intermediate_output_index=index, max_sequence_length=c.get("max_sequence_length", 77),
        layer_norm_epsilon=1e-5, final_layer_norm_epsilon=1e-6,  # KerasHub hard-codes both
    )


def t5_from_keras(obj: Any) -> T5Config:
    c = _keras_inner(obj)
    if not c.get("use_gated_activation", True):
        raise ConfigError("T5 config without gated activation is not a T5 v1.1 encoder")
    return T5Config(
        vocabulary_size=c["vocabulary_size"], hidden_dim=c["hidden_dim"], num_layers=c["num_layers"],
        num_heads=c["num_heads"], intermediate_dim=c["intermediate_dim"],
        key_value_dim=c.get("key_value_dim") or c["hidden_dim"] // c["num_heads"],
        activation=_keras_activation(c.get("activation", "gelu")),
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
    )


def vae_from_keras(obj: Any) -> VAEConfig:
    c = _keras_inner(obj)
    keys = ("encoder_num_filters", "encoder_num_blocks", "decoder_num_filters", "decoder_num_blocks",
            "input_channels", "sample_channels", "output_channels", "scale", "shift", "sampler_method")
    return VAEConfig(**{k: c[k] for k in keys if k in c})


def from_keras(config: dict) -> SD3Config:
    """Build from a KerasHub preset ``config.json`` (the whole file, or its inner ``config``)."""
    c = _keras_inner(config)
    if "mmdit_hidden_dim" not in c:
        raise ConfigError("not a StableDiffusion3Backbone config (no mmdit_hidden_dim)")
    clip_l, clip_g = clip_from_keras(c["clip_l"]), clip_from_keras(c["clip_g"])
    t5 = t5_from_keras(c["t5"]) if c.get("t5") else None
    return SD3Config(
        mmdit_patch_size=c["mmdit_patch_size"], mmdit_hidden_dim=c["mmdit_hidden_dim"],
        mmdit_num_layers=c["mmdit_num_layers"], mmdit_num_heads=c["mmdit_num_heads"],
        mmdit_position_size=c["mmdit_position_size"], mmdit_qk_norm=c.get("mmdit_qk_norm"),
        mmdit_dual_attention_indices=c.get("mmdit_dual_attention_indices") or (),
        latent_channels=c.get("latent_channels", 16), output_channels=c.get("output_channels", 3),
        num_train_timesteps=c.get("num_train_timesteps", 1000), shift=c.get("shift", 3.0),
        mmdit_context_dim=t5.hidden_dim if t5 else 4096,
        mmdit_pooled_dim=clip_l.hidden_dim + clip_g.hidden_dim,
        image_shape=tuple(c.get("image_shape", (1024, 1024, 3))),
        vae=vae_from_keras(c["vae"]), clip_l=clip_l, clip_g=clip_g, t5=t5,
    )


# -- diffusers folders -----------------------------------------------------------------------------------

def build_from_file(path, build, config):
    """``build(config)``, any error naming ``path``: config files are JSON anyone can edit, and a missing key,
    a null or a string where a number goes would otherwise surface as a bare KeyError / TypeError."""
    try:
        if not isinstance(config, dict):
            raise ConfigError("not a JSON object")
        return build(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: bad config ({type(e).__name__}: {e})") from None


def _read_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None


def clip_from_hf(c: dict) -> CLIPConfig:
    """A transformers ``CLIPTextConfig`` (or a CLIPConfig holding one as ``text_config``)."""
    c = c.get("text_config", c)
    eps = c.get("layer_norm_eps", 1e-5)
    return CLIPConfig(
        vocabulary_size=c["vocab_size"], hidden_dim=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], intermediate_dim=c["intermediate_size"],
        intermediate_activation=_activation(c.get("hidden_act", "quick_gelu")),
        intermediate_output_index=c["num_hidden_layers"] - 2,  # SD3 reads hidden_states[-2]
        max_sequence_length=c.get("max_position_embeddings", 77),
        layer_norm_epsilon=eps, final_layer_norm_epsilon=eps,
        # transformers: the legacy id 2 means argmax; a config without one takes CLIPTextConfig's 49407
        eos_token_id=None if c.get("eos_token_id", 49407) == 2 else c.get("eos_token_id", 49407),
    )


def t5_from_hf(c: dict) -> T5Config:
    proj = c.get("feed_forward_proj", "gated-gelu")
    if not proj.startswith("gated-"):
        raise ConfigError(f"T5 feed_forward_proj {proj!r} is not gated: not a T5 v1.1 encoder")
    # transformers maps "gated-gelu" to gelu_new (the tanh approximation); dense_act_fn says so explicitly.
    act = c.get("dense_act_fn") or ("gelu_new" if proj == "gated-gelu" else proj[len("gated-"):])
    return T5Config(
        vocabulary_size=c["vocab_size"], hidden_dim=c["d_model"], num_layers=c["num_layers"],
        num_heads=c["num_heads"], intermediate_dim=c["d_ff"], key_value_dim=c["d_kv"],
        activation=_activation(act), layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
        relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=c.get("relative_attention_max_distance", 128),
    )


def vae_from_diffusers(c: dict) -> VAEConfig:
    if c.get("use_quant_conv") or c.get("use_post_quant_conv"):
        raise ConfigError("VAE with quant_conv / post_quant_conv is not an SD3 VAE")
    filters = tuple(c["block_out_channels"])
    per_block = c.get("layers_per_block", 2)
    return VAEConfig(
        encoder_num_filters=filters, encoder_num_blocks=(per_block,) * len(filters),
        # diffusers' decoder mirrors the encoder with one extra ResNet block per level.
        decoder_num_filters=filters[::-1], decoder_num_blocks=(per_block + 1,) * len(filters),
        input_channels=c.get("in_channels", 3), sample_channels=2 * c.get("latent_channels", 16),
        output_channels=c.get("out_channels", 3), scale=c.get("scaling_factor", 1.5305),
        shift=c.get("shift_factor", 0.0609), num_groups=c.get("norm_num_groups", 32),
    )


def from_diffusers(folder) -> SD3Config:
    """Build from a diffusers ``StableDiffusion3Pipeline`` folder; absent subfolders give None parts."""
    from pathlib import Path

    folder = Path(folder)
    def parse(name, build, file="config.json"):
        """A component's config built by ``build``; None when the pipeline has no such component (no folder:
        leaving out text_encoder_3/ is the usual way to run without T5, whatever model_index.json lists). A
        folder that holds weights must have its config: without it they would be silently left out."""
        path = folder / name / file
        if not path.is_file():
            if (folder / name).is_dir() and any((folder / name).glob("*.safetensors*")):
                raise ConfigError(f"{path}: missing, but {folder / name} holds weights")
            return None
        return build_from_file(path, build, _read_json(path))

    vae_cfg = parse("vae", vae_from_diffusers)
    clip_l, clip_g, t5 = parse("text_encoder", clip_from_hf), parse("text_encoder_2", clip_from_hf), \
        parse("text_encoder_3", t5_from_hf)
    sched = parse("scheduler", dict, "scheduler_config.json") or {}  # diffusers' SchedulerMixin file name
    down = 2 ** (len(vae_cfg.encoder_num_filters) - 1) if vae_cfg else 8

    def backbone(tr):
        return SD3Config(
            mmdit_hidden_dim=tr["num_attention_heads"] * tr["attention_head_dim"],
            mmdit_num_layers=tr["num_layers"], mmdit_num_heads=tr["num_attention_heads"],
            mmdit_position_size=tr["pos_embed_max_size"], mmdit_patch_size=tr.get("patch_size", 2),
            mmdit_qk_norm=tr.get("qk_norm"), mmdit_dual_attention_indices=tuple(tr.get("dual_attention_layers") or ()),
            latent_channels=tr.get("in_channels", 16), output_channels=vae_cfg.output_channels if vae_cfg else 3,
            num_train_timesteps=sched.get("num_train_timesteps", 1000), shift=sched.get("shift", 3.0),
            mmdit_context_dim=tr.get("joint_attention_dim", 4096), mmdit_pooled_dim=tr.get("pooled_projection_dim", 2048),
            image_shape=(tr.get("sample_size", 128) * down,) * 2 + (3,), vae=vae_cfg, clip_l=clip_l, clip_g=clip_g, t5=t5,
        )

    config = parse("transformer", backbone)
    if config is None:
        raise ConfigError(f"{folder}: no transformer/config.json")
    return config


# -- canonical safetensors ---------------------------------------------------------------------------------

def from_metadata(meta: dict) -> Optional[SD3Config]:
    """The config a canonical file records in its ``__metadata__`` (None if it records none)."""
    text = (meta or {}).get("sd3ref.config")
    if not text:
        return None
    try:
        return SD3Config.from_json(text)
    except ConfigError as e:
        raise ConfigError(f"sd3ref.config metadata: {e}") from None
    except (ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"sd3ref.config metadata is not an SD3Config ({type(e).__name__}: {e})") from None


def _count(shapes: dict, pattern: str) -> int:
    """1 + the largest index captured by ``pattern`` (a regex with one group), 0 if none matches."""
    import re

    found = [int(m.group(1)) for n in shapes for m in [re.match(pattern, n)] if m]
    return max(found) + 1 if found else 0


def _infer_clip(shapes: dict, prefix: str, activation: str) -> Optional[CLIPConfig]:
    import re

    t = prefix + "text_model."
    emb = shapes.get(t + "embeddings.token_embedding.weight")
    if emb is None:
        return None
    layers = _count(shapes, re.escape(t) + r"encoder\.layers\.(\d+)\.")
    return CLIPConfig(
        vocabulary_size=emb[0], hidden_dim=emb[1], num_layers=layers,
        num_heads=max(emb[1] // 64, 1),  # OpenAI / OpenCLIP text towers use 64-wide heads
        intermediate_dim=shapes[t + "encoder.layers.0.mlp.fc1.weight"][0],
        intermediate_activation=activation, intermediate_output_index=layers - 2,
        max_sequence_length=shapes[t + "embeddings.position_embedding.weight"][0],
    )


def _infer_t5(shapes: dict, prefix: str) -> Optional[T5Config]:
    import re

    emb = shapes.get(prefix + "shared.weight")
    if emb is None:
        return None
    b = prefix + "encoder.block.0.layer."
    buckets, heads = shapes[b + "0.SelfAttention.relative_attention_bias.weight"]
    return T5Config(
        vocabulary_size=emb[0], hidden_dim=emb[1],
        num_layers=_count(shapes, re.escape(prefix) + r"encoder\.block\.(\d+)\."), num_heads=heads,
        intermediate_dim=shapes[b + "1.DenseReluDense.wi_0.weight"][0],
        key_value_dim=shapes[b + "0.SelfAttention.q.weight"][0] // heads,
        relative_attention_num_buckets=buckets,
    )


def _infer_vae(shapes: dict, p: str) -> Optional[VAEConfig]:
    import re

    if p + "encoder.conv_in.weight" not in shapes:
        return None
    levels = _count(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    enc = tuple(shapes[f"{p}encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels))
    enc_blocks = tuple(_count(shapes, re.escape(f"{p}encoder.down.{i}.") + r"block\.(\d+)\.") for i in range(levels))
    # LDM numbers decoder levels from the output end; configs list them in execution order.
    up = range(levels - 1, -1, -1)
    dec = tuple(shapes[f"{p}decoder.up.{i}.block.0.conv1.weight"][0] for i in up)
    dec_blocks = tuple(_count(shapes, re.escape(f"{p}decoder.up.{i}.") + r"block\.(\d+)\.") for i in up)
    return VAEConfig(
        encoder_num_filters=enc, encoder_num_blocks=enc_blocks, decoder_num_filters=dec, decoder_num_blocks=dec_blocks,
        input_channels=shapes[p + "encoder.conv_in.weight"][1], sample_channels=shapes[p + "encoder.conv_out.weight"][0],
        output_channels=shapes[p + "decoder.conv_out.weight"][0],
    )


def infer_from_shapes(shapes: dict) -> SD3Config:
    """Derive the config from canonical tensor names and shapes, as Stability's loader does: the
    MMDiT has 64-wide heads (or as wide as ``ln_k``), qk-norm if ``ln_k`` exists, dual attention where ``attn2`` exists.
    Values no tensor shows (scheduler shift, VAE scale/shift, epsilons, activations) take the SD3
    defaults: CLIP-L quick_gelu, CLIP-G exact gelu, T5 gated gelu-tanh."""
    import re

    from converters.canonical import PREFIX  # here: converters.canonical imports this module

    p = PREFIX["mmdit"]
    if p + "x_embedder.proj.weight" not in shapes:
        raise ConfigError(f"no MMDiT tensors ({p}x_embedder.proj.weight)")
    hidden, latent, patch, _ = shapes[p + "x_embedder.proj.weight"]
    positions = shapes[p + "pos_embed"][1]
    side = int(round(positions**0.5))
    if side * side != positions:
        raise ConfigError(f"pos_embed holds {positions} positions, not a square grid")
    layers = _count(shapes, re.escape(p) + r"joint_blocks\.(\d+)\.")
    vae = _infer_vae(shapes, PREFIX["vae"])
    ln_k = shapes.get(p + "joint_blocks.0.x_block.attn.ln_k.weight")
    head_dim = ln_k[0] if ln_k else 64  # qk-norm weights reveal the head width; otherwise Stability's 64
    clip_l = _infer_clip(shapes, PREFIX["clip_l"], "quick_gelu")
    clip_g = _infer_clip(shapes, PREFIX["clip_g"], "gelu")
    guessed = [(name, width) for name, width, guess in (("MMDiT", hidden, not ln_k),
                                                        ("CLIP-L", clip_l and clip_l.hidden_dim, True),
                                                        ("CLIP-G", clip_g and clip_g.hidden_dim, True))
               if guess and width and width % 64]
    if guessed:  # every SD3 / SD3.5 width is a multiple of 64: this model's heads are narrower
        import warnings

        warnings.warn("head counts guessed from 64-wide heads, but " + ", ".join(f"{n} is {w} wide" for n, w in guessed)
                      + ": pass the model's config (--config) for its real head counts")
    return SD3Config(
        mmdit_hidden_dim=hidden, mmdit_num_layers=layers, mmdit_num_heads=max(hidden // head_dim, 1),
        mmdit_position_size=side, mmdit_patch_size=patch,
        mmdit_qk_norm="rms_norm" if ln_k else None,
        mmdit_dual_attention_indices=tuple(i for i in range(layers) if f"{p}joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
        latent_channels=latent, output_channels=vae.output_channels if vae else 3,
        mmdit_context_dim=shapes[p + "context_embedder.weight"][1], mmdit_pooled_dim=shapes[p + "y_embedder.mlp.0.weight"][1],
        mmdit_mlp_ratio=shapes[p + "joint_blocks.0.x_block.mlp.fc1.weight"][0] / hidden,
        vae=vae,
        clip_l=clip_l, clip_g=clip_g, t5=_infer_t5(shapes, PREFIX["t5"]),
    )


# -- writing a KerasHub config.json --------------------------------------------------------------------------

def _keras_object(module: str, class_name: str, registered: str, config: dict, dtype: str) -> dict:
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": dtype}, "registered_name": None}
    return {"module": module, "class_name": class_name,
            "config": {"name": config.pop("name"), "trainable": True, "dtype": policy, **config},
            "registered_name": registered}


def _keras_activation_out(name: str):
    # KerasHub registers its tanh-approximate GELU as a serializable function.
    if name == "gelu_tanh":
        return {"module": "builtins", "class_name": "function", "config": "keras_hub>gelu_approximate",
                "registered_name": "function"}
    return name


def to_keras(cfg: SD3Config, dtypes: dict) -> dict:
    """A KerasHub ``config.json`` for ``StableDiffusion3Backbone.from_preset``. ``dtypes``: Keras dtype
    policy name per component ("mmdit" is the backbone's). KerasHub hard-codes the epsilons, so
    values other than its own cannot be expressed and are not written."""
    if cfg.clip_l is None or cfg.clip_g is None or cfg.vae is None:
        raise ConfigError("a KerasHub StableDiffusion3Backbone needs the VAE and both CLIP encoders")

    def clip(c: CLIPConfig, name: str) -> dict:
        return _keras_object("keras_hub.src.models.clip.clip_text_encoder", "CLIPTextEncoder", "keras_hub>CLIPTextEncoder", dict(
            name=name, vocabulary_size=c.vocabulary_size, embedding_dim=c.hidden_dim, hidden_dim=c.hidden_dim,
            num_layers=c.num_layers, num_heads=c.num_heads, intermediate_dim=c.intermediate_dim,
            intermediate_activation=c.intermediate_activation, intermediate_output_index=c.intermediate_output_index,
            max_sequence_length=c.max_sequence_length), dtypes[name])

    v = cfg.vae
    vae = _keras_object("keras_hub.src.models.vae.vae_backbone", "VAEBackbone", "VAEBackbone", dict(
        name="vae", encoder_num_filters=list(v.encoder_num_filters), encoder_num_blocks=list(v.encoder_num_blocks),
        decoder_num_filters=list(v.decoder_num_filters), decoder_num_blocks=list(v.decoder_num_blocks),
        sampler_method=v.sampler_method, input_channels=v.input_channels, sample_channels=v.sample_channels,
        output_channels=v.output_channels, scale=v.scale, shift=v.shift), dtypes["vae"])
    t5 = None
    if cfg.t5 is not None:
        t = cfg.t5
        t5 = _keras_object("keras_hub.src.models.stable_diffusion_3.t5_encoder", "T5Encoder", "T5Encoder", dict(
            name="t5", vocabulary_size=t.vocabulary_size, hidden_dim=t.hidden_dim, intermediate_dim=t.intermediate_dim,
            num_layers=t.num_layers, num_heads=t.num_heads, activation=_keras_activation_out(t.activation),
            key_value_dim=t.key_value_dim, dropout=0.0, use_gated_activation=True,
            layer_norm_epsilon=t.layer_norm_epsilon, tie_embedding_weights=True), dtypes["t5"])
    return _keras_object("keras_hub.src.models.stable_diffusion_3.stable_diffusion_3_backbone", "StableDiffusion3Backbone",
                         "keras_hub>StableDiffusion3Backbone", dict(
        name="stable_diffusion3_backbone", mmdit_patch_size=cfg.mmdit_patch_size, mmdit_hidden_dim=cfg.mmdit_hidden_dim,
        mmdit_num_layers=cfg.mmdit_num_layers, mmdit_num_heads=cfg.mmdit_num_heads,
        mmdit_position_size=cfg.mmdit_position_size, mmdit_qk_norm=cfg.mmdit_qk_norm,
        mmdit_dual_attention_indices=list(cfg.mmdit_dual_attention_indices) or None,
        vae=vae, clip_l=clip(cfg.clip_l, "clip_l"), clip_g=clip(cfg.clip_g, "clip_g"), t5=t5,
        latent_channels=cfg.latent_channels, output_channels=cfg.output_channels,
        num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift, image_shape=list(cfg.image_shape)),
        dtypes["mmdit"])
