"""KerasHub side of the golden fixtures: a KerasHub SD3 of the same shape holding the diffusers
pipeline's weights, saved as a preset, with every component's outputs (NHWC, KerasHub's layout).

Runs on the Keras numpy backend without TensorFlow, with keras-hub 0.32's workarounds (golden/README.md)."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("KERAS_BACKEND", "numpy")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
from keras_hub.src.models.clip.clip_tokenizer import CLIPTokenizer as _KerasCLIPTokenizer  # noqa: E402
from keras_hub.src.models.stable_diffusion_3.flow_match_euler_discrete_scheduler import \
    FlowMatchEulerDiscreteScheduler  # noqa: E402
from keras_hub.src.models.stable_diffusion_3.t5_encoder import T5Encoder  # noqa: E402
from keras_hub.src.models.vae import vae_layers  # noqa: E402
from keras_hub.src.models.vae.vae_backbone import VAEBackbone  # noqa: E402
from keras_hub.src.utils.keras_utils import gelu_approximate  # noqa: E402

from golden import sets as S  # noqa: E402
from golden.diffusers_side import CLIP_VOCAB  # noqa: E402

_orig_set_vocab = _KerasCLIPTokenizer._set_vocabulary_and_merges_tokenizers


def _set_vocab(self, vocabulary, merges):
    # keras-hub 0.32 without TensorFlow never sets these (golden/README.md).
    self.vocabulary, self.merges = vocabulary.copy(), merges
    return _orig_set_vocab(self, vocabulary, merges)


_KerasCLIPTokenizer._set_vocabulary_and_merges_tokenizers = _set_vocab


def _clip(spec: dict, name: str, dtype):
    return keras_hub.models.CLIPTextEncoder(dtype=dtype,
        vocabulary_size=CLIP_VOCAB, embedding_dim=spec["hidden"], hidden_dim=spec["hidden"],
        num_layers=spec["layers"], num_heads=spec["heads"], intermediate_dim=spec["intermediate"],
        intermediate_activation=spec["act"], intermediate_output_index=-2, max_sequence_length=77, name=name)


def float32_copy(spec: dict, tokenizer_paths: dict, stored):
    """(backbone, preprocessor): a float32 backbone holding ``stored``'s weights (a loaded preset of the same
    architecture, whose weights come in the same order; `from_preset` keeps the stored 16-bit dtypes as
    the nested models' compute dtypes, while the golden outputs are KerasHub's float32 computation)."""
    backbone, preprocessor = build(spec, tokenizer_paths)
    assert len(stored.weights) == len(backbone.weights)
    for target, source in zip(backbone.weights, stored.weights):
        target.assign(keras.ops.cast(source, "float32"))
    return backbone, preprocessor


def build(spec: dict, tokenizer_paths: dict, storage: dict | None = None):
    """Returns (backbone, preprocessor). KerasHub's own conventions are kept: CLIP final LN eps 1e-6,
    T5 with exact GELU (KerasHub's T5 v1.1 default), 77 T5 tokens, 77 zero tokens without T5.
    With `storage`, each component takes its stored dtype (the preset that is saved), as the real
    presets do; without, everything is float32 (the backbone that computes the golden outputs)."""
    m, t5 = spec["mmdit"], spec["t5"]
    dt = storage or dict(mmdit="float32", vae="float32", clip="float32", t5="float32")
    ch = list(spec["vae"]["channels"])
    vae = VAEBackbone(encoder_num_filters=ch, encoder_num_blocks=[1] * 4, decoder_num_filters=ch[::-1],
                      decoder_num_blocks=[2] * 4, sampler_method="sample", input_channels=3,
                      sample_channels=32, output_channels=3, scale=1.5305, shift=0.0609, name="vae",
                      dtype=dt["vae"])
    t5_encoder = None
    if t5:
        t5_encoder = T5Encoder(vocabulary_size=t5["vocab"], num_layers=t5["layers"], num_heads=t5["heads"],
                               hidden_dim=t5["hidden"], intermediate_dim=t5["ff"], key_value_dim=t5["kv"],
                               dropout=0.0, activation="gelu", use_gated_activation=True,
                               layer_norm_epsilon=1e-6, tie_embedding_weights=True, name="t5",
                               dtype=dt["t5"])
    backbone = keras_hub.models.StableDiffusion3Backbone(
        mmdit_patch_size=2, mmdit_hidden_dim=m["hidden"], mmdit_num_layers=m["layers"],
        mmdit_num_heads=m["heads"], mmdit_position_size=m["position_size"], mmdit_qk_norm=m["qk_norm"],
        mmdit_dual_attention_indices=tuple(m["dual"]) or None, vae=vae, clip_l=_clip(S.CLIP_L, "clip_l", dt["clip"]),
        clip_g=_clip(S.CLIP_G, "clip_g", dt["clip"]), t5=t5_encoder, image_shape=(*spec["image"], 3),
        dtype=dt["mmdit"])
    vocab, merges = f"{tokenizer_paths['clip_dir']}/vocab.json", f"{tokenizer_paths['clip_dir']}/merges.txt"
    # to_lower=False: the CLIP tokenizer's own normaliser lowercases; to_lower=True needs TensorFlow.
    clip_l_pre = keras_hub.models.CLIPPreprocessor(
        keras_hub.models.CLIPTokenizer(vocabulary=vocab, merges=merges, pad_with_end_token=True,
                                       config_file="clip_l_tokenizer.json"),
        sequence_length=77, to_lower=False, config_file="clip_l_preprocessor.json")
    clip_g_pre = keras_hub.models.CLIPPreprocessor(
        keras_hub.models.CLIPTokenizer(vocabulary=vocab, merges=merges, config_file="clip_g_tokenizer.json"),
        sequence_length=77, to_lower=False, config_file="clip_g_preprocessor.json")
    t5_pre = None
    if t5:
        t5_pre = keras_hub.models.T5Preprocessor(
            keras_hub.models.T5Tokenizer(proto=tokenizer_paths["spiece"], config_file="t5_tokenizer.json"),
            sequence_length=S.KERAS_T5_LENGTH, config_file="t5_preprocessor.json")
    preprocessor = keras_hub.models.StableDiffusion3TextToImagePreprocessor(clip_l_pre, clip_g_pre, t5_pre)
    return backbone, preprocessor


class _Assigner:
    """Copies diffusers tensors into Keras variables, checking shapes, and that every Keras variable
    is written exactly once and every source tensor is used."""

    def __init__(self, tensors: dict):
        self.src = {k: v.detach().float().numpy() for k, v in tensors.items()}
        self.used, self.written = set(), set()

    def take(self, key):
        self.used.add(key)
        return self.src[key]

    def put(self, var, value):
        value = np.asarray(value, np.float32)
        if tuple(var.shape) != value.shape:
            raise ValueError(f"{var.path}: shape {tuple(var.shape)} vs source {value.shape}")
        if id(var) in self.written:
            raise ValueError(f"{var.path} written twice")
        var.assign(value)
        # The values are representable in every stored dtype (golden.diffusers_side.round_to_storage).
        if not np.array_equal(np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(var, "float32"))), value):
            raise ValueError(f"{var.path}: value changed when stored as {var.dtype}")
        self.written.add(id(var))

    def dense(self, layer, key, swap_halves=False, bias=True):
        w = self.take(key + ".weight")  # torch Linear (out, in)
        b = self.take(key + ".bias") if bias else None
        if swap_halves:  # diffusers AdaLayerNormContinuous (scale, shift) -> KerasHub (shift, scale)
            w = np.concatenate(np.split(w, 2, axis=0)[::-1], axis=0)
            b = np.concatenate(np.split(b, 2)[::-1])
        self.put(layer.kernel, w.T)
        if bias:
            self.put(layer.bias, b)

    def fused(self, layer, keys):
        self.put(layer.kernel, np.concatenate([self.take(k + ".weight") for k in keys], 0).T)
        self.put(layer.bias, np.concatenate([self.take(k + ".bias") for k in keys], 0))

    def conv(self, layer, key, linear=False):
        w = self.take(key + ".weight")
        self.put(layer.kernel, w.T[None, None] if linear else w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        self.put(layer.bias, self.take(key + ".bias"))

    def norm(self, layer, key, bias=True):
        self.put(layer.weights[0], self.take(key + ".weight"))
        if bias:
            self.put(layer.weights[1], self.take(key + ".bias"))

    def check_done(self, model, what):
        missing = [v.path for v in model.weights if id(v) not in self.written]
        unused = sorted(set(self.src) - self.used)
        if missing or unused:
            raise ValueError(f"{what}: keras vars not written {missing}; source tensors unused {unused}")


def assign_weights(backbone, pipe) -> None:
    _assign_mmdit(backbone.diffuser, pipe.transformer.state_dict(), len(backbone.diffuser.joint_blocks))
    _assign_vae(backbone.vae, pipe.vae.state_dict())
    for enc, proj, te in ((backbone.clip_l, backbone.clip_l_projection, pipe.text_encoder),
                          (backbone.clip_g, backbone.clip_g_projection, pipe.text_encoder_2)):
        a = _assign_clip(enc, te.state_dict())
        a.put(proj.dense.kernel, a.take("text_projection.weight").T)
        a.check_done(enc, "clip")
    if backbone.t5 is not None:
        _assign_t5(backbone.t5, pipe.text_encoder_3.state_dict())


def _assign_mmdit(mmdit, sd, num_layers):
    a = _Assigner(sd)
    a.conv(mmdit.patch_embedding.patch_embedding, "pos_embed.proj")
    a.put(mmdit.position_embedding.weights[0], a.take("pos_embed.pos_embed")[0])
    a.dense(mmdit.context_embedding, "context_embedder")
    a.dense(mmdit.vector_embedding.dense1, "time_text_embed.text_embedder.linear_1")
    a.dense(mmdit.vector_embedding.dense2, "time_text_embed.text_embedder.linear_2")
    a.dense(mmdit.timestep_embedding.mlp.dense1, "time_text_embed.timestep_embedder.linear_1")
    a.dense(mmdit.timestep_embedding.mlp.dense2, "time_text_embed.timestep_embedder.linear_2")
    for i, block in enumerate(mmdit.joint_blocks):
        p, x, c = f"transformer_blocks.{i}.", block.x_block, block.context_block
        last = i == num_layers - 1
        a.dense(x.ada_layer_norm.dense, p + "norm1.linear")
        a.fused(x.attention_qkv, [p + f"attn.to_{n}" for n in "qkv"])
        a.dense(x.attention_proj, p + "attn.to_out.0")
        a.dense(x.mlp.dense1, p + "ff.net.0.proj")
        a.dense(x.mlp.dense2, p + "ff.net.2")
        a.dense(c.ada_layer_norm.dense, p + "norm1_context.linear", swap_halves=last)
        a.fused(c.attention_qkv, [p + f"attn.add_{n}_proj" for n in "qkv"])
        if hasattr(x, "q_norm") and x.q_norm is not None:
            a.norm(x.q_norm, p + "attn.norm_q", bias=False)
            a.norm(x.k_norm, p + "attn.norm_k", bias=False)
            a.norm(c.q_norm, p + "attn.norm_added_q", bias=False)
            a.norm(c.k_norm, p + "attn.norm_added_k", bias=False)
        if getattr(x, "use_dual_attention", False):
            a.fused(x.attention_qkv2, [p + f"attn2.to_{n}" for n in "qkv"])
            a.dense(x.attention_proj2, p + "attn2.to_out.0")
            if x.q_norm2 is not None:
                a.norm(x.q_norm2, p + "attn2.norm_q", bias=False)
                a.norm(x.k_norm2, p + "attn2.norm_k", bias=False)
        if not last:
            a.dense(c.attention_proj, p + "attn.to_add_out")
            a.dense(c.mlp.dense1, p + "ff_context.net.0.proj")
            a.dense(c.mlp.dense2, p + "ff_context.net.2")
    a.dense(mmdit.output_ada_layer_norm.dense, "norm_out.linear", swap_halves=True)
    a.dense(mmdit.output_dense, "proj_out")
    a.check_done(mmdit, "mmdit")


def _assign_resnet(a, block, key):
    a.norm(block.norm1, key + ".norm1")
    a.conv(block.conv1, key + ".conv1")
    a.norm(block.norm2, key + ".norm2")
    a.conv(block.conv2, key + ".conv2")
    if block.has_residual_projection:
        a.conv(block.residual_projection, key + ".conv_shortcut")


def _assign_mid(a, part, key):
    _assign_resnet(a, part.mid_block_0, key + ".mid_block.resnets.0")
    att = part.mid_attention
    a.norm(att.group_norm, key + ".mid_block.attentions.0.group_norm")
    for layer, name in ((att.query_conv2d, "to_q"), (att.key_conv2d, "to_k"), (att.value_conv2d, "to_v"),
                        (att.output_conv2d, "to_out.0")):
        a.conv(layer, f"{key}.mid_block.attentions.0.{name}", linear=True)
    _assign_resnet(a, part.mid_block_1, key + ".mid_block.resnets.1")


def _assign_stages(a, part, num_blocks, resamplers, key, kind):
    """ResNet blocks (a flat list in KerasHub) and the down/up-sampling convs of one VAE half.
    diffusers numbers both halves by execution order (up_blocks.0 runs first), as KerasHub does."""
    blocks = iter(part.blocks)
    for i, n in enumerate(num_blocks):
        for j in range(n):
            _assign_resnet(a, next(blocks), f"{key}.{kind}_blocks.{i}.resnets.{j}")
    convs = [layer for layer in resamplers if isinstance(layer, keras.layers.Conv2D)]  # not the pad / upsample
    for i, layer in enumerate(convs):
        a.conv(layer, f"{key}.{kind}_blocks.{i}.{kind}samplers.0.conv")


def _assign_vae(vae, sd):
    a = _Assigner(sd)
    enc, dec = vae.encoder, vae.decoder
    a.conv(enc.input_projection, "encoder.conv_in")
    _assign_stages(a, enc, vae.encoder_num_blocks, enc.downsamples, "encoder", "down")
    _assign_mid(a, enc, "encoder")
    a.norm(enc.output_norm, "encoder.conv_norm_out")
    a.conv(enc.output_projection, "encoder.conv_out")
    a.conv(dec.input_projection, "decoder.conv_in")
    _assign_mid(a, dec, "decoder")
    _assign_stages(a, dec, vae.decoder_num_blocks, dec.upsamples, "decoder", "up")
    a.norm(dec.output_norm, "decoder.conv_norm_out")
    a.conv(dec.output_projection, "decoder.conv_out")
    a.check_done(vae, "vae")


def _assign_clip(enc, sd):
    a = _Assigner(sd)
    a.put(enc.embedding.token_embedding.embeddings, a.take("text_model.embeddings.token_embedding.weight"))
    a.put(enc.embedding.position_embedding.weights[0], a.take("text_model.embeddings.position_embedding.weight"))
    for i, layer in enumerate(enc.encoder_layers):
        p = f"text_model.encoder.layers.{i}."
        a.norm(layer.layer_norm_1, p + "layer_norm1")
        a.norm(layer.layer_norm_2, p + "layer_norm2")
        att = layer.attention
        heads, hd = att.num_heads, att.key_dim
        for dense, name in ((att._query_dense, "q_proj"), (att._key_dense, "k_proj"), (att._value_dense, "v_proj")):
            a.put(dense.kernel, a.take(p + f"self_attn.{name}.weight").T.reshape(-1, heads, hd))
            a.put(dense.bias, a.take(p + f"self_attn.{name}.bias").reshape(heads, hd))
        a.put(att._output_dense.kernel, a.take(p + "self_attn.out_proj.weight").T.reshape(heads, hd, -1))
        a.put(att._output_dense.bias, a.take(p + "self_attn.out_proj.bias"))
        a.dense(layer.dense_1, p + "mlp.fc1")
        a.dense(layer.dense_2, p + "mlp.fc2")
    a.norm(enc.layer_norm, "text_model.final_layer_norm")
    return a


def _assign_t5(t5, sd):
    a = _Assigner(sd)
    a.put(t5.token_embedding.embeddings, a.take("shared.weight"))
    a.used.add("encoder.embed_tokens.weight")  # tied to shared.weight
    for i, layer in enumerate(t5.encoder_transformer_layers):
        p = f"encoder.block.{i}.layer."
        att = layer.self_attention
        for dense, n in ((att.query_projector, "q"), (att.key_projector, "k"), (att.value_projector, "v"),
                         (att.output_projector, "o")):
            a.put(dense.kernel, a.take(f"{p}0.SelfAttention.{n}.weight").T)
        if i == 0:
            a.put(att.relative_attention_bias, a.take(f"{p}0.SelfAttention.relative_attention_bias.weight"))
        a.norm(layer.self_attention_layer_norm, p + "0.layer_norm", bias=False)
        for dense, n in ((layer.input_projector, "wi_0"), (layer.gate_projector, "wi_1"), (layer.output_projector, "wo")):
            a.put(dense.kernel, a.take(f"{p}1.DenseReluDense.{n}.weight").T)
        a.norm(layer.layer_norm, p + "1.layer_norm", bias=False)
    a.norm(t5.encoder_layer_norm, "encoder.final_layer_norm", bias=False)
    a.check_done(t5, "t5")


def align_with_diffusers(backbone) -> None:
    """The documented alignments for the cross-check: HF's CLIP final-LN eps and T5 tanh GELU."""
    backbone.clip_l.layer_norm.epsilon = backbone.clip_g.layer_norm.epsilon = 1e-5
    if backbone.t5 is not None:
        for layer in backbone.t5.encoder_transformer_layers:
            layer.input_projector.activation = keras.activations.get(gelu_approximate)


@contextlib.contextmanager
def injected_normal(arrays: list):
    """KerasHub's VAE sampler draws keras.random.normal from an unseeded generator: feed it NumPy ε."""
    original = vae_layers.keras.random.normal
    queue = list(arrays)

    def fake(shape, dtype=None, seed=None, **kwargs):
        x = queue.pop(0)
        assert tuple(shape) == x.shape, (shape, x.shape)
        return keras.ops.convert_to_tensor(x, dtype=dtype)

    vae_layers.keras.random.normal = fake
    try:
        yield
    finally:
        vae_layers.keras.random.normal = original
    assert not queue


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


class _StepRecorder:
    """Wraps backbone.denoise_step to record the latents after every step of the task's own loop."""

    def __init__(self, backbone, prefix):
        self.backbone, self.prefix, self.out, self.count = backbone, prefix, {}, 0
        self.original = backbone.denoise_step

    def __enter__(self):
        def wrapped(*args, **kwargs):
            latents = self.original(*args, **kwargs)
            self.count += 1
            self.out[f"{self.prefix}/latents_{self.count}"] = _np(latents)
            return latents
        self.backbone.denoise_step = wrapped
        return self

    def __exit__(self, *exc):
        del self.backbone.denoise_step


def run(backbone, preprocessor, spec: dict, inputs: dict) -> dict:
    out = {}
    prompts = spec["prompts"]
    negatives = [S.NEGATIVE_PROMPT] * len(prompts)
    tokens = {k: _np(v).astype(np.int32) for k, v in preprocessor.generate_preprocess(prompts).items()}
    neg_tokens = {k: _np(v).astype(np.int32) for k, v in preprocessor.generate_preprocess(negatives).items()}
    out.update({f"tokens/{k}": v for k, v in tokens.items()})
    out.update({f"neg_tokens/{k}": v for k, v in neg_tokens.items()})
    for key, enc, proj in (("clip_l", backbone.clip_l, backbone.clip_l_projection),
                           ("clip_g", backbone.clip_g, backbone.clip_g_projection)):
        o = enc({"token_ids": tokens[key]}, training=False)
        out[f"{key}/intermediate"] = _np(o["intermediate_output"])
        out[f"{key}/sequence"] = _np(o["sequence_output"])
        out[f"{key}/pooled"] = _np(proj(o["sequence_output"], tokens[key], training=False))
    if backbone.t5 is not None:
        out["t5/sequence"] = _np(backbone.t5({"token_ids": tokens["t5"],
                                              "padding_mask": np.ones_like(tokens["t5"])}, training=False))
    ctx, neg_ctx, pooled, neg_pooled = backbone.encode_text_step(tokens, neg_tokens)
    # The negative context is not stored (size): the CFG runs below depend on it.
    out.update({"cond/context": _np(ctx), "cond/pooled": _np(pooled), "cond/neg_pooled": _np(neg_pooled)})

    out["mmdit/velocity"] = _np(backbone.diffuser({
        "latent": inputs["mmdit/latents"], "context": inputs["mmdit/context"],
        "pooled_projection": inputs["mmdit/pooled"], "timestep": inputs["mmdit/timestep"][:, None]},
        training=False))

    moments = _np(backbone.vae.encoder(inputs["vae/image"], training=False))
    out["vae/mean"], out["vae/logvar"] = np.split(moments, 2, axis=-1)
    with injected_normal([inputs["vae/eps"]]):
        out["vae/sample"] = _np(backbone.vae.encode(inputs["vae/image"]))
    out["vae/decoded"] = _np(backbone.vae.decode(inputs["vae/z"], training=False))

    for n, shift in S.SCHEDULES:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        sched.set_sigmas(n)
        sigmas = _np(sched.sigmas)
        out[f"scheduler/sigmas_n{n}_shift{shift}"] = sigmas.astype(np.float64)
        out[f"scheduler/timesteps_n{n}_shift{shift}"] = _np(sched._sigma_to_timestep(sched.sigmas[:-1])).astype(np.float64)

    token_pair = (tokens, neg_tokens)
    # As the tasks' generate() passes them: int32 and float tensors, not Python numbers.
    guidance = keras.ops.convert_to_tensor(S.GUIDANCE)
    t2i_steps, i2i_steps = (keras.ops.convert_to_tensor(n, "int32") for n in (S.T2I_STEPS, S.I2I_STEPS))
    t2i = keras_hub.models.StableDiffusion3TextToImage(backbone=backbone, preprocessor=preprocessor)
    backbone.configure_scheduler(S.T2I_STEPS)
    with _StepRecorder(backbone, "t2i") as rec:
        decoded = t2i.generate_step(inputs["t2i/latents"], token_pair, t2i_steps, guidance)
    out.update(rec.out)
    out["t2i/latents_0"] = inputs["t2i/latents"]
    _finish(out, t2i, "t2i", decoded)

    start = keras.ops.convert_to_tensor(int(S.I2I_STEPS * (1 - S.I2I_STRENGTH)), "int32")
    backbone.configure_scheduler(S.I2I_STEPS)
    i2i = keras_hub.models.StableDiffusion3ImageToImage(backbone=backbone, preprocessor=preprocessor)
    with _StepRecorder(backbone, "i2i") as rec, injected_normal([inputs["i2i/vae_eps"]]):
        decoded = i2i.generate_step(inputs["i2i/image"], inputs["i2i/noise"], token_pair, start,
                                    i2i_steps, guidance)
    out.update(rec.out)
    _finish(out, i2i, "i2i", decoded)

    inpaint = keras_hub.models.StableDiffusion3Inpaint(backbone=backbone, preprocessor=preprocessor)
    # The inpaint loop blends after denoise_step, so its per-step latents are not observable from
    # outside; the final latents are, as the argument of decode_step.
    original_decode = backbone.decode_step
    steps_run = S.I2I_STEPS - int(S.I2I_STEPS * (1 - S.I2I_STRENGTH))
    for prefix, mask in (("inpaint", "inpaint/mask"), ("inpaint_px", "inpaint/pixel_mask")):
        def recording_decode(latents, prefix=prefix):
            out[f"{prefix}/latents_{steps_run}"] = _np(latents)
            return original_decode(latents)

        backbone.decode_step = recording_decode
        with injected_normal([inputs["i2i/vae_eps"]]):
            decoded = inpaint.generate_step(inputs["i2i/image"], inputs[mask], inputs["i2i/noise"],
                                            token_pair, start, i2i_steps, guidance)
        del backbone.decode_step
        _finish(out, inpaint, prefix, decoded)
    out.update(_start_steps(i2i, inpaint, inputs))
    return out


class _Captured(Exception):
    pass


def _start_steps(i2i, inpaint, inputs) -> dict:
    """Each task's first step over START_STEPS_N × START_STEPS_STRENGTH as its generate() computes it:
    generate() is called with its compiled loop replaced by a function that records the starting_step
    argument (position 3 in ImageToImage's call, 4 in Inpaint's, after the masks) and stops."""
    image = inputs["i2i/image"][0]
    out = {}
    for prefix, task, position, extra in (("i2i", i2i, 3, {}),
                                          ("inpaint", inpaint, 4, {"masks": inputs["inpaint/mask"][0]})):
        seen = []

        def capture(*args):
            seen.append(int(_np(args[position])))
            raise _Captured

        task.make_generate_function = lambda: capture
        table = np.zeros((len(S.START_STEPS_N), len(S.START_STEPS_STRENGTH)), np.int32)
        for i, n in enumerate(S.START_STEPS_N):
            for j, strength in enumerate(S.START_STEPS_STRENGTH):
                try:
                    task.generate({"images": image, "prompts": S.NEGATIVE_PROMPT, **extra}, num_steps=n,
                                  strength=strength)
                except _Captured:
                    pass
                table[i, j] = seen.pop()
        del task.make_generate_function
        out[f"{prefix}/start_steps"] = table
    return out


def _finish(out, task, prefix, decoded):
    out[f"{prefix}/decoded"] = _np(decoded)
    # KerasHub's own post-processing: round(clip((x+1)/2, 0, 1)·255).
    out[f"{prefix}/image_uint8"] = task._normalize_generate_outputs([decoded], False)


def save_preset(backbone, preprocessor, folder: str) -> None:
    # The order of KerasHub's conversion script: preprocessor first, then the backbone.
    preprocessor.save_to_preset(folder)
    backbone.save_to_preset(folder)


def check_preset(folder: str, reference) -> dict:
    """Reloads the preset with KerasHub's from_preset and checks every weight equals the float32
    backbone's that computed the outputs."""
    loaded = keras_hub.models.StableDiffusion3Backbone.from_preset(folder)
    # Auto-numbered layer names differ between instances: the same architecture lists weights in the same order.
    assert len(loaded.weights) == len(reference.weights)
    mismatched = []
    for v, r in zip(loaded.weights, reference.weights):
        a = keras.ops.convert_to_numpy(keras.ops.cast(v, "float32"))
        if a.shape != tuple(r.shape) or not np.array_equal(a, keras.ops.convert_to_numpy(r)):
            mismatched.append(v.path)
    dtypes = sorted({str(v.dtype) for v in loaded.weights})
    return {"loader": "keras_hub.models.StableDiffusion3Backbone.from_preset(keras/)",
            "weights": len(loaded.weights), "stored_dtypes": dtypes, "mismatched": mismatched}
