"""A reference trace of diffusers / transformers under sd3ref's trace names (docs/porting.md), with torch
forward hooks: the "trace the reference" step of the porting workflow, shown on a golden set.

    /work/venvs/golden/bin/python -m golden.trace_diffusers sd3 [--dtype float64] -o diffusers.safetensors
    python -m sd3ref trace golden/sd3/diffusers --inputs golden/sd3/inputs.npz \\
        --inputs golden/sd3/diffusers_float32.npz [--dtype float64] -o ours.safetensors
    python -m sd3ref compare diffusers.safetensors ours.safetensors

The run is sd3ref.trace.run's: the text encoders and `encode_prompt` on the set's prompts (diffusers'
tokens, 256 T5 tokens), the MMDiT on `inputs.npz`'s mmdit/*, the VAE encoder on vae/image (and the
pipeline's latent normalisation of its mean), the decoder on vae/z taken as a diffusion latent. Tensors
keep diffusers' layouts (NCHW, merged or head-major q/k/v): `compare` aligns them. Like the generator, this
does not import sd3ref; the file format is sd3ref's (safetensors, execution order in the metadata).
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from golden import sets as S
from golden.diffusers_side import float32_pins_lifted, nchw, to_numpy
from golden.trace_format import GOLDEN, save


class Recorder:
    """Forward hooks that store module outputs under trace names."""

    def __init__(self):
        self.tensors, self.handles = {}, []

    def put(self, name, value):
        if name in self.tensors:
            raise KeyError(f"recorded twice: {name}")
        self.tensors[name] = to_numpy(value)

    def hook(self, module, name, pick=lambda out: out[0] if isinstance(out, tuple) else out):
        self.handles.append(module.register_forward_hook(lambda m, args, out: self.put(name, pick(out))))

    def hook_input(self, module, name):
        self.handles.append(module.register_forward_pre_hook(lambda m, args: self.put(name, args[0])))

    def hook_split(self, module, names):
        """A Linear whose output is chunked: names in the module's own chunk order."""
        def record(m, args, out):
            for name, chunk in zip(names, out.chunk(len(names), dim=1)):
                if name is not None:
                    self.put(name, chunk)
        self.handles.append(module.register_forward_hook(record))

    def close(self):
        for h in self.handles:
            h.remove()


ZERO_CHUNKS = ["shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp"]
ZERO_X_CHUNKS = ZERO_CHUNKS + ["shift_msa2", "scale_msa2", "gate_msa2"]


def hook_text(rec: Recorder, pipe) -> None:
    if pipe.text_encoder_3 is not None:
        enc = pipe.text_encoder_3.encoder
        rec.hook(enc.embed_tokens, "t5.embeddings")
        for i, block in enumerate(enc.block):
            rec.hook(block.layer[0].SelfAttention, f"t5.layers.{i}.attn")
            rec.hook(block.layer[1].DenseReluDense, f"t5.layers.{i}.mlp")
            rec.hook(block, f"t5.layers.{i}.out")
        rec.hook(enc.final_layer_norm, "t5.final_layer_norm")
    for name, te in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        tm = te.text_model
        rec.hook(tm.embeddings, f"{name}.embeddings")
        for i, layer in enumerate(tm.encoder.layers):
            rec.hook(layer.self_attn, f"{name}.layers.{i}.attn")
            rec.hook(layer.mlp, f"{name}.layers.{i}.mlp")
            rec.hook(layer, f"{name}.layers.{i}.out")
        rec.hook(tm.final_layer_norm, f"{name}.final_layer_norm")
        rec.hook(tm, f"{name}.eos", pick=lambda out: out.pooler_output)
        rec.hook(te.text_projection, f"{name}.pooled")


def hook_mmdit(rec: Recorder, transformer) -> None:
    rec.hook(transformer.pos_embed, "mmdit.x_embed")
    tte = transformer.time_text_embed
    rec.hook(tte.time_proj, "mmdit.t_freq")
    rec.hook(tte.timestep_embedder, "mmdit.t_embed")
    rec.hook(tte.text_embedder, "mmdit.y_embed")
    rec.hook(tte, "mmdit.c")
    rec.hook(transformer.context_embedder, "mmdit.context_embed")
    for i, block in enumerate(transformer.transformer_blocks):
        p, attn = f"mmdit.blocks.{i}.", block.attn
        dual = block.use_dual_attention
        rec.hook_split(block.norm1.linear, [p + "x.mod." + c for c in (ZERO_X_CHUNKS if dual else ZERO_CHUNKS)])
        if block.context_pre_only:  # AdaLayerNormContinuous: (scale, shift)
            rec.hook_split(block.norm1_context.linear, [p + "context.mod.scale_msa", p + "context.mod.shift_msa"])
        else:
            rec.hook_split(block.norm1_context.linear, [p + "context.mod." + c for c in ZERO_CHUNKS])
        # q and k after the qk RMSNorm where there is one (head-major), else the projections (merged heads)
        qk = attn.norm_q is not None
        for n in "qkv":
            rec.hook(getattr(attn, f"norm_{n}") if qk and n != "v" else getattr(attn, f"to_{n}"), p + f"x.{n}")
            rec.hook(getattr(attn, f"norm_added_{n}") if qk and n != "v" else getattr(attn, f"add_{n}_proj"),
                     p + f"context.{n}")
        rec.hook_input(attn.to_out[0], p + "x.sdpa")  # the attention output, heads merged, before to_out
        rec.hook(attn, p + "x.attn")
        if not block.context_pre_only:
            rec.hook_input(attn.to_add_out, p + "context.sdpa")
            rec.hook(attn, p + "context.attn", pick=lambda out: out[1])
            rec.hook(block.ff_context, p + "context.mlp")
            rec.hook(block, p + "context.out", pick=lambda out: out[0])
        if dual:
            for n in "qkv":
                rec.hook(getattr(block.attn2, f"norm_{n}") if qk and n != "v" else getattr(block.attn2, f"to_{n}"),
                         p + f"x.{n}2")
            rec.hook_input(block.attn2.to_out[0], p + "x.sdpa2")
            rec.hook(block.attn2, p + "x.attn2")
        rec.hook(block.ff, p + "x.mlp")
        rec.hook(block, p + "x.out", pick=lambda out: out[1])
    rec.hook_split(transformer.norm_out.linear, ["mmdit.final.mod.scale", "mmdit.final.mod.shift"])
    rec.hook(transformer.proj_out, "mmdit.final.linear")


def hook_vae(rec: Recorder, vae) -> None:
    for part in ("encoder", "decoder"):
        m = getattr(vae, part)
        rec.hook(m.conv_in, f"vae.{part}.conv_in")
        rec.hook(m.mid_block, f"vae.{part}.mid")
        for i, block in enumerate(m.down_blocks if part == "encoder" else m.up_blocks):
            rec.hook(block, f"vae.{part}.stages.{i}")
    rec.hook(vae.decoder, "vae.decoder.out")


@torch.no_grad()
def run(set_name: str, dtype) -> dict:
    set_dir = GOLDEN / set_name
    spec = S.SETS[set_name]
    with np.load(set_dir / "inputs.npz") as f:
        inputs = {k: f[k] for k in f.files}
    no_t5 = {} if spec["t5"] else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(set_dir / "diffusers", torch_dtype=dtype, **no_t5)
    rec = Recorder()
    hook_text(rec, pipe)
    hook_mmdit(rec, pipe.transformer)
    hook_vae(rec, pipe.vae)
    try:
        context, _, pooled, _ = pipe.encode_prompt(prompt=spec["prompts"], prompt_2=None, prompt_3=None,
                                                   do_classifier_free_guidance=False,
                                                   max_sequence_length=S.DIFFUSERS_T5_LENGTH)
        rec.put("cond.context", context)
        rec.put("cond.pooled", pooled)

        timestep = torch.from_numpy(inputs["mmdit/timestep"]).to(dtype)
        rec.put("mmdit.timestep", timestep)
        v = pipe.transformer(hidden_states=nchw(inputs["mmdit/latents"], dtype),
                             encoder_hidden_states=torch.from_numpy(inputs["mmdit/context"]).to(dtype),
                             pooled_projections=torch.from_numpy(inputs["mmdit/pooled"]).to(dtype),
                             timestep=timestep, return_dict=False)[0]
        rec.put("mmdit.velocity", v)

        cfg = pipe.vae.config
        dist = pipe.vae.encode(nchw(inputs["vae/image"], dtype)).latent_dist
        rec.put("vae.encoder.mean", dist.mean)
        rec.put("vae.encoder.logvar", dist.logvar)
        # the img2img pipeline's normalisation of an encoded image
        rec.put("vae.to_latent", (dist.mean - cfg.shift_factor) * cfg.scaling_factor)
        # the text-to-image pipeline's, before decoding
        z = nchw(inputs["vae/z"], dtype) / cfg.scaling_factor + cfg.shift_factor
        rec.put("vae.from_latent", z)
        pipe.vae.decode(z)
    finally:
        rec.close()
    return rec.tensors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=sorted(S.SETS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    with float32_pins_lifted() if dtype == torch.float64 else contextlib.nullcontext():
        tensors = run(args.set, dtype)
    save(tensors, args.output, {"source": f"diffusers golden/{args.set}", "dtype": args.dtype,
                                "convention": "diffusers", "tool": "golden.trace_diffusers"})
    print(f"{len(tensors)} tensors ({args.dtype}) -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
