"""diffusers / transformers side of the golden fixtures: build the tiny pipeline, perturb its weights,
save it, and record every component's outputs (NCHW, diffusers' native layout)."""

from __future__ import annotations

import contextlib
import inspect
import os
import textwrap

import numpy as np
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline,
                       StableDiffusion3Pipeline)
from diffusers.models import embeddings as embeddings_module
from diffusers.models import normalization as normalization_module
from diffusers.models.autoencoders import vae as vae_module
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img as img2img_module
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_inpaint as inpaint_module
from transformers.models.t5 import modeling_t5
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

from golden import sets as S

CLIP_VOCAB = 574  # golden/tokenizers/clip: 572 = <|startoftext|>, 573 = <|endoftext|>


def _clip(spec: dict) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], projection_dim=spec["hidden"],
        hidden_act=spec["act"], max_position_embeddings=77, bos_token_id=572, eos_token_id=573,
        pad_token_id=573, layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0))


def build(spec: dict, tokenizer_paths: dict) -> StableDiffusion3Pipeline:
    torch.manual_seed(spec["seed"])
    m, t5 = spec["mmdit"], spec["t5"]
    text_encoder, text_encoder_2 = _clip(S.CLIP_L), _clip(S.CLIP_G)
    text_encoder_3 = tokenizer_3 = None
    if t5:
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=t5["vocab"], d_model=t5["hidden"], d_kv=t5["kv"], d_ff=t5["ff"],
            num_layers=t5["layers"], num_heads=t5["heads"], relative_attention_num_buckets=32,
            relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False, pad_token_id=0,
            eos_token_id=1, tie_word_embeddings=False))
        # transformers 5 ignores vocab_file in the constructor: from_pretrained reads the folder.
        tokenizer_3 = T5Tokenizer.from_pretrained(os.path.dirname(tokenizer_paths["spiece"]), extra_ids=0)
    h, w = spec["image"]
    transformer = SD3Transformer2DModel(
        sample_size=h // 8, patch_size=2, in_channels=16, num_layers=m["layers"],
        attention_head_dim=m["hidden"] // m["heads"], num_attention_heads=m["heads"],
        joint_attention_dim=t5["hidden"] if t5 else 4096, caption_projection_dim=m["hidden"],
        pooled_projection_dim=S.CLIP_L["hidden"] + S.CLIP_G["hidden"], out_channels=16,
        pos_embed_max_size=m["position_size"], dual_attention_layers=tuple(m["dual"]), qk_norm=m["qk_norm"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=spec["vae"]["channels"],
        layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=h,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    tok_l = CLIPTokenizer.from_pretrained(tokenizer_paths["clip_dir"], model_max_length=77)
    tok_g = CLIPTokenizer.from_pretrained(tokenizer_paths["clip_dir"], model_max_length=77, pad_token="!")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tok_l, text_encoder_2=text_encoder_2, tokenizer_2=tok_g,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    perturb(pipe, spec["seed"])
    round_to_storage(pipe, spec["storage"])
    return pipe


@torch.no_grad()
def perturb(pipe, seed: int) -> None:
    """Move every weight away from its initialisation (unit norm scales, zero biases, identity-like
    tables) so that a mapping mistake — a transposed kernel, swapped halves, a dropped bias — shows."""
    gen = torch.Generator().manual_seed(seed + 1000)
    for model in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if model is None:
            continue
        tensors = dict(model.named_parameters())
        tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("pos_embed"))
        for name in sorted(tensors):
            t = tensors[name]
            std = float(t.std()) if t.numel() > 1 else 0.0
            scale = 0.1 * std if std > 0 else 0.1
            t.add_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * scale)


def components(pipe) -> dict:
    """Pipeline models by the storage-dtype component names of golden.sets."""
    return {"mmdit": [pipe.transformer], "vae": [pipe.vae], "clip": [pipe.text_encoder, pipe.text_encoder_2],
            "t5": [pipe.text_encoder_3] if pipe.text_encoder_3 is not None else []}


@torch.no_grad()
def round_to_storage(pipe, storage: dict) -> None:
    """Round every weight to its stored dtype, so the 16-bit files and the float32 models hold the same values."""
    for part, models in components(pipe).items():
        dtype = getattr(torch, storage[part])
        for model in models:
            for t in list(model.parameters()) + [b for n, b in model.named_buffers() if n.endswith("pos_embed")]:
                t.copy_(t.to(dtype).to(t.dtype))
    # KerasHub keeps the CLIP projections in the backbone, in the MMDiT's dtype: they must fit both.
    for model in components(pipe)["clip"]:
        w = model.text_projection.weight
        w.copy_(w.to(getattr(torch, storage["mmdit"])).to(w.dtype))


def save_pretrained(pipe, folder: str, storage: dict) -> None:
    """save_pretrained with each model in its stored dtype (exact: the values are representable)."""
    for part, models in components(pipe).items():
        for model in models:
            model.to(getattr(torch, storage[part]))
    pipe.save_pretrained(folder)
    pipe.to(torch.float32)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@contextlib.contextmanager
def injected_noise(module, arrays: list):
    """Make `module.randn_tensor` return the given arrays in turn: the pipelines' own noise draws, fed
    with NumPy noise so the runs are reproducible in any framework."""
    original = module.randn_tensor
    queue = list(arrays)

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        t = queue.pop(0)
        assert tuple(t.shape) == tuple(shape), (t.shape, shape)
        return t.to(dtype=dtype)

    module.randn_tensor = fake
    try:
        yield
    finally:
        module.randn_tensor = original
    assert not queue, "not every injected noise array was used"


# Where torch code pins float32 even in a float64 model: the sinusoidal timestep embedding
# (`timesteps.float()`), T5's and diffusers' RMSNorm variance (`.to(torch.float32)`) and the flow-match
# scheduler (float32 sigmas, `sample.to(torch.float32)` in step). Left alone, the "float64" outputs
# would only be float32-accurate there.
FLOAT32_PINS = [(embeddings_module, "get_timestep_embedding"), (modeling_t5.T5LayerNorm, "forward"),
                (normalization_module.RMSNorm, "forward"), (FlowMatchEulerDiscreteScheduler, "set_timesteps"),
                (FlowMatchEulerDiscreteScheduler, "step")]


@contextlib.contextmanager
def float32_pins_lifted():
    """Runs the frameworks' own code for FLOAT32_PINS with `torch.float32` → `torch.float64` and
    `.float()` → `.double()`, nothing else changed: a float64 reference that is float64 throughout."""
    originals = []
    for owner, name in FLOAT32_PINS:
        fn = getattr(owner, name)
        source = textwrap.dedent(inspect.getsource(fn))
        lifted = source.replace("torch.float32", "torch.float64").replace(".float()", ".double()")
        if lifted == source:
            raise RuntimeError(f"{owner.__name__}.{name}: no float32 pin found (framework changed?)")
        namespace = dict(fn.__globals__)
        exec(compile(lifted, inspect.getsourcefile(fn), "exec"), namespace)
        originals.append((owner, name, fn))
        setattr(owner, name, namespace[name])
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def nchw(x: np.ndarray, dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype)


def run(pipe, spec: dict, inputs: dict, dtype, t5_length: int = S.DIFFUSERS_T5_LENGTH) -> dict:
    """Every component and stage in `dtype` (torch.float32 or float64)."""
    with (float32_pins_lifted() if dtype == torch.float64 else contextlib.nullcontext()):
        return _run(pipe, spec, inputs, dtype, t5_length)


@torch.no_grad()
def _run(pipe, spec: dict, inputs: dict, dtype, t5_length: int) -> dict:
    pipe.to(dtype)
    out = {}
    prompts = spec["prompts"]
    negatives = [S.NEGATIVE_PROMPT] * len(prompts)
    # Tokens exactly as the pipeline makes them.
    ids = {}
    for key, tok in (("clip_l", pipe.tokenizer), ("clip_g", pipe.tokenizer_2)):
        ids[key] = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out[f"tokens/{key}"] = to_numpy(ids[key]).astype(np.int32)
        out[f"neg_tokens/{key}"] = to_numpy(tok(negatives, padding="max_length", max_length=77, truncation=True,
                                                return_tensors="pt").input_ids).astype(np.int32)
    for key, enc in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        o = enc(ids[key], output_hidden_states=True)
        out[f"{key}/intermediate"] = to_numpy(o.hidden_states[-2])
        out[f"{key}/sequence"] = to_numpy(o.last_hidden_state)
        out[f"{key}/pooled"] = to_numpy(o.text_embeds)
        specials = (ids[key] == enc.config.eos_token_id) | (ids[key] == ids[key][:, :1])  # EOS and the start token
        no_eos = torch.where(specials, S.NO_EOS_ID, ids[key])
        out[f"{key}/pooled_without_eos"] = to_numpy(enc(no_eos).text_embeds)
    if pipe.text_encoder_3 is not None:
        t5_ids, neg_t5_ids = (pipe.tokenizer_3(texts, padding="max_length", max_length=t5_length, truncation=True,
                                               add_special_tokens=True, return_tensors="pt").input_ids
                              for texts in (prompts, negatives))
        out["tokens/t5"] = to_numpy(t5_ids).astype(np.int32)
        out["neg_tokens/t5"] = to_numpy(neg_t5_ids).astype(np.int32)
        out["t5/sequence"] = to_numpy(pipe.text_encoder_3(t5_ids)[0])
        attention = type(pipe.text_encoder_3.encoder.block[0].layer[0].SelfAttention)
        for n, d in S.T5_BUCKETS:  # the middle row of a (2d + 3)² table: distances -(d + 1) .. d + 1
            rel = torch.arange(2 * d + 3)[None, :] - (d + 1)
            out[f"t5/buckets_{n}_{d}"] = to_numpy(attention._relative_position_bucket(
                rel, bidirectional=True, num_buckets=n, max_distance=d)[0]).astype(np.int32)
    ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=negatives,
        do_classifier_free_guidance=True, max_sequence_length=t5_length)
    # The negative context is not stored (size): the CFG runs below depend on it.
    out.update({"cond/context": to_numpy(ctx), "cond/pooled": to_numpy(pooled), "cond/neg_pooled": to_numpy(neg_pooled)})

    # MMDiT on given latents / timesteps / context / pooled.
    v = pipe.transformer(hidden_states=nchw(inputs["mmdit/latents"], dtype),
                         encoder_hidden_states=torch.from_numpy(inputs["mmdit/context"]).to(dtype),
                         pooled_projections=torch.from_numpy(inputs["mmdit/pooled"]).to(dtype),
                         timestep=torch.from_numpy(inputs["mmdit/timestep"]).to(dtype), return_dict=False)[0]
    out["mmdit/velocity"] = to_numpy(v)

    # VAE: encoder moments, a sample with the given eps, decoder.
    dist = pipe.vae.encode(nchw(inputs["vae/image"], dtype)).latent_dist
    out["vae/mean"], out["vae/logvar"] = to_numpy(dist.mean), to_numpy(dist.logvar)
    with injected_noise(vae_module, [nchw(inputs["vae/eps"], dtype)]):
        out["vae/sample"] = to_numpy(dist.sample())
    out["vae/decoded"] = to_numpy(pipe.vae.decode(nchw(inputs["vae/z"], dtype)).sample)

    # Scheduler.
    for n, shift in S.SCHEDULES:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        sched.set_timesteps(n)
        out[f"scheduler/sigmas_n{n}_shift{shift}"] = to_numpy(sched.sigmas).astype(np.float64)
        out[f"scheduler/timesteps_n{n}_shift{shift}"] = to_numpy(sched.timesteps).astype(np.float64)

    out.update(_t2i(pipe, spec, inputs, dtype, t5_length))
    out.update(_i2i(pipe, spec, inputs, dtype, t5_length, inpaint=False))
    out.update(_i2i(pipe, spec, inputs, dtype, t5_length, inpaint=True))
    out.update(_i2i(pipe, spec, inputs, dtype, t5_length, inpaint=True, mask="inpaint/pixel_mask"))
    out.update(_start_steps(pipe))
    return out


def _start_steps(pipe) -> dict:
    """Each task's first step over START_STEPS_N × START_STEPS_STRENGTH, from its own get_timesteps (it
    returns the timesteps it will run), on a fresh scheduler so the runs above are unaffected."""
    out = {}
    for prefix, cls in (("i2i", StableDiffusion3Img2ImgPipeline), ("inpaint", StableDiffusion3InpaintPipeline)):
        task = cls(**{**pipe.components, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)})
        table = np.zeros((len(S.START_STEPS_N), len(S.START_STEPS_STRENGTH)), np.int32)
        for i, n in enumerate(S.START_STEPS_N):
            for j, strength in enumerate(S.START_STEPS_STRENGTH):
                task.scheduler.set_timesteps(n)
                _, steps_run = task.get_timesteps(n, strength, "cpu")
                table[i, j] = n - steps_run
        out[f"{prefix}/start_steps"] = table
    return out


class _Recorder:
    """Captures each step's latents (callback_on_step_end) and the raw VAE decoder output."""

    def __init__(self, pipe, prefix: str):
        self.prefix, self.out, self.step = prefix, {}, 0
        self.hook = pipe.vae.decoder.register_forward_hook(self._decoded)

    def _decoded(self, module, args, output):
        self.out[f"{self.prefix}/decoded"] = to_numpy(output)

    def on_step_end(self, pipe, i, t, kwargs):
        self.step += 1
        self.out[f"{self.prefix}/latents_{self.step}"] = to_numpy(kwargs["latents"])
        return {}

    def close(self, images_01) -> dict:
        self.hook.remove()
        # diffusers' own uint8 conversion: (x·255).round() of the [0, 1] image.
        np_images = to_numpy(images_01.permute(0, 2, 3, 1).float())
        self.out[f"{self.prefix}/image_uint8"] = np.stack(
            [np.asarray(im) for im in StableDiffusion3Pipeline.numpy_to_pil(np_images)])
        return self.out


def _common_args(spec, rec, t5_length):
    return dict(prompt=spec["prompts"], negative_prompt=[S.NEGATIVE_PROMPT] * len(spec["prompts"]),
                height=spec["image"][0], width=spec["image"][1], guidance_scale=S.GUIDANCE,
                max_sequence_length=t5_length, output_type="pt", callback_on_step_end=rec.on_step_end,
                callback_on_step_end_tensor_inputs=["latents"])


def _t2i(pipe, spec, inputs, dtype, t5_length) -> dict:
    rec = _Recorder(pipe, "t2i")
    start = nchw(inputs["t2i/latents"], dtype)
    rec.out["t2i/latents_0"] = to_numpy(start)
    images = pipe(num_inference_steps=S.T2I_STEPS, latents=start, **_common_args(spec, rec, t5_length)).images
    return rec.close(images)


def _i2i(pipe, spec, inputs, dtype, t5_length, inpaint: bool, mask="inpaint/mask") -> dict:
    prefix = ("inpaint" if mask == "inpaint/mask" else "inpaint_px") if inpaint else "i2i"
    cls, module = ((StableDiffusion3InpaintPipeline, inpaint_module) if inpaint
                   else (StableDiffusion3Img2ImgPipeline, img2img_module))
    task = cls(**pipe.components)
    rec = _Recorder(pipe, prefix)
    image = nchw(inputs["i2i/image"], dtype)
    kwargs = dict(image=image, strength=S.I2I_STRENGTH, num_inference_steps=S.I2I_STEPS,
                  **_common_args(spec, rec, t5_length))
    if inpaint:
        kwargs["mask_image"] = torch.from_numpy(inputs[mask][:, None]).to(dtype)
    # SD3 inpaint also encodes the masked image (used only by 33-channel inpainting transformers):
    # a second VAE sample, which does not reach the output.
    vae_eps = [nchw(inputs["i2i/vae_eps"], dtype)] * (2 if inpaint else 1)
    with injected_noise(vae_module, vae_eps), \
            injected_noise(module, [nchw(inputs["i2i/noise"], dtype)]):
        images = task(**kwargs).images
    return rec.close(images)
