"""A reference trace of KerasHub under sd3ref's trace names (docs/porting.md), by wrapping the `call` of
its layers: the "trace the reference" step of the porting workflow for KerasHub, on a golden set.

    KERAS_BACKEND=numpy /work/venvs/golden/bin/python -m golden.trace_keras sd3 -o keras.safetensors
    python -m sd3ref trace golden/sd3/keras --inputs golden/sd3/inputs.npz \\
        --inputs golden/sd3/keras_float32.npz --convention keras -o ours.safetensors
    python -m sd3ref compare keras.safetensors ours.safetensors

The run is sd3ref.trace.run's, float32 (KerasHub cannot compute in float64): the text encoders and
`encode_text_step` on KerasHub's tokens of the set's prompts (77 T5 tokens), the MMDiT on `inputs.npz`'s
mmdit/*, the VAE encoder on vae/image and `image_rescaling` of its mean, `latent_rescaling` of vae/z and
the decoder. KerasHub's layouts are kept (fused qkv, token-major q/k after the qk-norm, fused adaLN
outputs): `compare` aligns them. Compared with sd3ref's trace of the *diffusers* form, the first divergence
is KerasHub's first convention (`docs/conventions.md`).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "numpy")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from golden import keras_side  # noqa: E402  (also: the keras-hub-without-TensorFlow tokenizer workaround)
from golden import sets as S  # noqa: E402
from golden import make_tokenizers  # noqa: E402
from golden.trace_format import GOLDEN, save  # noqa: E402


class Recorder:
    """Wraps layers' `call` to store outputs under trace names while `on`."""

    def __init__(self):
        self.tensors, self.on = {}, True

    def put(self, name, value):
        if not self.on:
            return
        if name in self.tensors:
            raise KeyError(f"recorded twice: {name}")
        self.tensors[name] = np.array(keras_side._np(value))

    def wrap(self, layer, name, pick=lambda out: out[0] if isinstance(out, (tuple, list)) else out,
             input_name=None):
        original = layer.call

        def call(*args, **kwargs):
            if input_name:
                self.put(input_name, args[0])
            out = original(*args, **kwargs)
            self.put(name, pick(out))
            return out
        layer.call = call


def wrap_text(rec: Recorder, backbone) -> None:
    if backbone.t5 is not None:
        t5 = backbone.t5
        rec.wrap(t5.token_embedding, "t5.embeddings")
        for i, layer in enumerate(t5.encoder_transformer_layers):
            rec.wrap(layer.self_attention, f"t5.layers.{i}.attn")
            rec.wrap(layer.output_projector, f"t5.layers.{i}.mlp")
            rec.wrap(layer, f"t5.layers.{i}.out")
        rec.wrap(t5.encoder_layer_norm, "t5.final_layer_norm")
    for name, enc in (("clip_l", backbone.clip_l), ("clip_g", backbone.clip_g)):
        rec.wrap(enc.embedding, f"{name}.embeddings")
        for i, layer in enumerate(enc.encoder_layers):
            rec.wrap(layer.attention, f"{name}.layers.{i}.attn")
            rec.wrap(layer.dense_2, f"{name}.layers.{i}.mlp")
            rec.wrap(layer, f"{name}.layers.{i}.out")
        rec.wrap(enc.layer_norm, f"{name}.final_layer_norm")
    rec.wrap(backbone.clip_l_projection, "clip_l.pooled")
    rec.wrap(backbone.clip_g_projection, "clip_g.pooled")


def wrap_mmdit(rec: Recorder, mmdit) -> None:
    rec.wrap(mmdit.position_embedding_add, "mmdit.x_embed")
    rec.wrap(mmdit.timestep_embedding.mlp, "mmdit.t_embed", input_name="mmdit.t_freq")
    rec.wrap(mmdit.vector_embedding, "mmdit.y_embed")
    rec.wrap(mmdit.vector_embedding_add, "mmdit.c")
    rec.wrap(mmdit.context_embedding, "mmdit.context_embed")
    for i, block in enumerate(mmdit.joint_blocks):
        p = f"mmdit.blocks.{i}."
        for stream, part in (("x", block.x_block), ("context", block.context_block)):
            rec.wrap(part.ada_layer_norm.dense, p + stream + ".mod")  # fused, Stability's chunk order
            rec.wrap(part.attention_qkv, p + stream + ".qkv")  # fused (3, heads, hd)
            if part.qk_norm is not None:  # token-major (B, L, heads, hd)
                rec.wrap(part.q_norm, p + stream + ".q")
                rec.wrap(part.k_norm, p + stream + ".k")
            if part.use_projection:
                rec.wrap(part.attention_proj, p + stream + ".attn", input_name=p + stream + ".sdpa")
                rec.wrap(part.mlp, p + stream + ".mlp")
            if part.use_dual_attention:
                rec.wrap(part.attention_qkv2, p + stream + ".qkv2")
                if part.qk_norm is not None:
                    rec.wrap(part.q_norm2, p + stream + ".q2")
                    rec.wrap(part.k_norm2, p + stream + ".k2")
                rec.wrap(part.attention_proj2, p + stream + ".attn2", input_name=p + stream + ".sdpa2")
        rec.wrap(block, p + "x.out")  # MMDiTBlock returns (x, context), or x after the pre-only block
        if block.use_context_projection:
            rec.wrap(block, p + "context.out", pick=lambda out: out[1])
    rec.wrap(mmdit.output_ada_layer_norm.dense, "mmdit.final.mod")
    rec.wrap(mmdit.output_dense, "mmdit.final.linear")


def wrap_vae(rec: Recorder, vae) -> None:
    for part, ups in (("encoder", "downsamples"), ("decoder", "upsamples")):
        m = getattr(vae, part)
        rec.wrap(m.input_projection, f"vae.{part}.conv_in")
        rec.wrap(m.mid_block_1, f"vae.{part}.mid")
        # A stage ends with its resampling conv, the last stage (none) with its last block.
        convs = [layer for layer in getattr(m, ups) if isinstance(layer, keras.layers.Conv2D)]
        ends = convs + [m.blocks[-1]]
        for i, layer in enumerate(ends):
            rec.wrap(layer, f"vae.{part}.stages.{i}")
    rec.wrap(vae.decoder, "vae.decoder.out")


def float32_backbone(set_name: str):
    """The golden preset's weights in a float32 backbone (keras_side.float32_copy)."""
    stored = keras_hub.models.StableDiffusion3Backbone.from_preset(str(GOLDEN / set_name / "keras"))
    return keras_side.float32_copy(S.SETS[set_name], make_tokenizers.paths(str(GOLDEN / "tokenizers")), stored)


def run(set_name: str) -> dict:
    set_dir = GOLDEN / set_name
    with np.load(set_dir / "inputs.npz") as f:
        inputs = {k: f[k] for k in f.files}
    backbone, preprocessor = float32_backbone(set_name)
    rec = Recorder()
    wrap_text(rec, backbone)
    wrap_mmdit(rec, backbone.diffuser)
    wrap_vae(rec, backbone.vae)

    prompts = S.SETS[set_name]["prompts"]
    tokens = {k: keras_side._np(v).astype(np.int32)
              for k, v in preprocessor.generate_preprocess(prompts).items()}
    if backbone.t5 is not None:
        backbone.t5({"token_ids": tokens["t5"], "padding_mask": np.ones_like(tokens["t5"])}, training=False)
    for key, enc, proj in (("clip_l", backbone.clip_l, backbone.clip_l_projection),
                           ("clip_g", backbone.clip_g, backbone.clip_g_projection)):
        sequence = enc({"token_ids": tokens[key]}, training=False)["sequence_output"]
        # CLIPProjection gathers the EOS state (the largest id) before its dense layer
        rec.put(f"{key}.eos", np.asarray(sequence)[np.arange(len(prompts)), tokens[key].argmax(-1)])
        proj(sequence, tokens[key], training=False)
    rec.on = False  # encode_text_step runs the encoders again (and on the negative prompts)
    context, _, pooled, _ = backbone.encode_text_step(tokens, tokens)
    rec.on = True
    rec.put("cond.context", context)
    rec.put("cond.pooled", pooled)

    rec.put("mmdit.timestep", inputs["mmdit/timestep"])
    rec.put("mmdit.velocity", backbone.diffuser({
        "latent": inputs["mmdit/latents"], "context": inputs["mmdit/context"],
        "pooled_projection": inputs["mmdit/pooled"], "timestep": inputs["mmdit/timestep"][:, None]},
        training=False))

    mean, logvar = np.split(np.asarray(backbone.vae.encoder(inputs["vae/image"], training=False)), 2, axis=-1)
    rec.put("vae.encoder.mean", mean)
    rec.put("vae.encoder.logvar", np.clip(logvar, -30.0, 20.0))  # as DiagonalGaussianDistributionSampler clamps
    rec.put("vae.to_latent", backbone.image_rescaling(mean))
    z = backbone.latent_rescaling(inputs["vae/z"])
    rec.put("vae.from_latent", z)
    backbone.vae.decode(z, training=False)
    return rec.tensors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=sorted(S.SETS))
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    tensors = run(args.set)
    save(tensors, args.output, {"source": f"keras golden/{args.set}", "dtype": "float32", "convention": "keras",
                                "tool": "golden.trace_keras"})
    print(f"{len(tensors)} tensors (float32) -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
