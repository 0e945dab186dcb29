"""The generation tasks around the components: text-to-image, image-to-image, inpainting.

KerasHub (``StableDiffusion3TextToImage`` / ``ImageToImage`` / ``Inpaint``), diffusers
(``StableDiffusion3Pipeline`` / ``Img2ImgPipeline`` / ``InpaintPipeline``) and Stability's ``sd3_infer.py``
run the same loop; where they differ is named by ``convention`` (docs/conventions.md):

* text conditioning: ``conditioning.condition`` (token counts, the CLIP-L pooled vector), T5 length,
  CLIP-G padding (``T5_LENGTH``, ``load_tokenizers``);
* inpainting under ``diffusers``: diffusers 0.42.1 decodes ``latents / scale`` without ``+ shift``;
* the uint8 conversion (``to_uint8``), which is a separate choice of the caller.

Layouts are NHWC. Images are in [-1, 1]; latents are diffusion latents (after ``vae.to_latent``),
(B, H/8, W/8, C). Randomness is the caller's: pass the initial latents / noise / VAE ε to reproduce a
framework's run, or a ``numpy.random.Generator`` to ``generate``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import scheduler, trace, vae
from .model import Model
from .tokenizers import CLIP_SEQUENCE_LENGTH, CLIPTokenizer, T5Tokenizer, TokenizerFileError

# Default T5 token count per convention: KerasHub's T5Preprocessor (sequence_length 256 unless the preset's
# preprocessor.json says otherwise: ``Tokenizers.preset_t5_length``; 77 in the golden presets), diffusers'
# max_sequence_length, Stability's max(77, longest prompt + 1) (``T5Tokenizer.encode(length=None)``).
T5_LENGTH = {"keras": 256, "diffusers": 256, "sai": None}
ROUNDINGS = ("keras", "diffusers", "sai")


class PipelineError(ValueError):
    """Inputs a generation run cannot use (sizes, step counts, missing components or tokenizers)."""


# -- tokenizers ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tokenizers:
    clip_l: CLIPTokenizer
    clip_g: CLIPTokenizer
    t5: Optional[T5Tokenizer] = None
    preset_t5_length: Optional[int] = None  # a KerasHub preset's T5Preprocessor sequence_length (the keras convention's)


def _clip_g_options(convention):
    # The files only give vocabulary and merges; padding is the framework's: KerasHub and Stability pad
    # CLIP-G with id 0, diffusers with the special token "!" (docs/tokenizers.md).
    if convention == "diffusers":
        return {"pad_token": "!", "extra_special_tokens": ("!",)}
    return {"pad_id": 0, "extra_special_tokens": ()}


def _t5_file(path: Path) -> Optional[Path]:
    if path.is_file():
        return path
    # the SentencePiece model itself first; a tokenizer.json is rebuilt into it
    return next((path / n for n in ("spiece.model", "vocabulary.spm", "tokenizer.json") if (path / n).is_file()), None)


def load_tokenizers(source=None, convention="keras", clip_l=None, clip_g=None, t5=None) -> Tokenizers:
    """The tokenizers of a KerasHub preset (``assets/``) or a diffusers folder (``tokenizer*/``); explicit
    ``clip_l`` / ``clip_g`` folders (KerasHub assets, HF tokenizer folders) and a ``t5`` file (SentencePiece
    model or HF tokenizer.json) or folder holding ``spiece.model``, ``vocabulary.spm`` or ``tokenizer.json``
    take precedence — a Stability file holds none. ``t5`` stays None when no T5 tokenizer is found."""
    root = Path(source) if source is not None and Path(source).is_dir() else None
    keras = root is not None and (root / "assets").is_dir()
    found = {}
    if root is not None:
        found = ({"clip_l": root / "assets/clip_l_tokenizer", "clip_g": root / "assets/clip_g_tokenizer",
                  "t5": root / "assets/t5_tokenizer"} if keras else
                 {"clip_l": root / "tokenizer", "clip_g": root / "tokenizer_2", "t5": root / "tokenizer_3"})
    paths = {k: Path(v) for k, v in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5)) if v is not None}
    paths = {**{k: v for k, v in found.items() if v.exists()}, **paths}
    missing = [k for k in ("clip_l", "clip_g") if k not in paths]
    if missing:
        flags = " and ".join(f"--{k.replace('_', '-')}-tokenizer" for k in missing)
        raise PipelineError(f"{source or 'the weights'}: no {' / '.join(missing)} tokenizer found; pass {flags}")
    t5_file = _t5_file(paths["t5"]) if "t5" in paths else None
    if "t5" in paths and t5_file is None and t5 is not None:
        raise TokenizerFileError(f"{t5}: no such file or folder" if not Path(t5).exists() else
                                 f"{t5}: no spiece.model, vocabulary.spm or tokenizer.json")
    return Tokenizers(CLIPTokenizer.from_dir(str(paths["clip_l"])),
                      CLIPTokenizer.from_dir(str(paths["clip_g"]), **_clip_g_options(convention)),
                      T5Tokenizer.from_file(str(t5_file)) if t5_file else None,
                      _preset_t5_length(root / "preprocessor.json") if keras else None)


def _preset_t5_length(path: Path) -> Optional[int]:
    """The T5Preprocessor sequence_length a KerasHub preset's preprocessor.json records, if any."""
    import json

    if not path.is_file():
        return None
    try:
        t5 = json.loads(path.read_text())["config"]["t5_preprocessor"]  # null in a preset without T5
        length = t5["config"]["sequence_length"] if t5 else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: no T5 sequence_length read ({type(e).__name__}: {e}); T5 prompts get "
                      f"{T5_LENGTH['keras']} tokens", stacklevel=3)
        return None
    return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None


def check_tokenizers(tokenizers: Tokenizers, config) -> None:
    """Each tokenizer's vocabulary must fit its encoder: a CLIP tokenizer exactly (a smaller or larger
    vocabulary means another model's tokenizer), T5 at most (T5's embedding table has 32,128 rows for
    SentencePiece's 32,000 pieces)."""
    for name in ("clip_l", "clip_g"):
        n, m = len(getattr(tokenizers, name).vocab), getattr(config, name).vocabulary_size
        if n != m:
            raise PipelineError(f"the {name} tokenizer has {n} tokens but the {name} encoder embeds {m}")
        positions = getattr(config, name).max_sequence_length
        if positions < CLIP_SEQUENCE_LENGTH:  # a KerasHub preset may shorten its CLIPPreprocessor; SD3's never do
            raise PipelineError(f"the {name} encoder has {positions} positions; sd3ref tokenizes CLIP prompts to "
                                f"{CLIP_SEQUENCE_LENGTH} tokens")
    if tokenizers.t5 is not None and config.t5 is not None:
        n, m = tokenizers.t5.sp.get_piece_size(), config.t5.vocabulary_size
        if n > m:
            raise PipelineError(f"the T5 tokenizer has {n} pieces but the T5 encoder embeds only {m}")


def t5_tokens(tokenizers: Tokenizers, convention="keras", t5_length=None) -> Optional[int]:
    """The T5 token count: ``t5_length`` if given (diffusers' max_sequence_length), else under keras the
    preset's T5Preprocessor length, else the convention's default (None: Stability's max(77, n + 1))."""
    if t5_length is not None:
        if t5_length < 1:
            raise PipelineError(f"t5_length must be at least 1, got {t5_length}")
        return t5_length
    if convention == "keras" and tokenizers.preset_t5_length is not None:
        return tokenizers.preset_t5_length
    return T5_LENGTH[convention]


def tokenize(tokenizers: Tokenizers, prompts, convention="keras", use_t5=True, t5_length=None) -> dict:
    """prompts (str or list) → {"clip_l": (B, 77), "clip_g": (B, 77)[, "t5": (B, L5)]} int32, L5 from
    ``t5_tokens``. Long prompts are truncated with a warning (KerasHub truncates silently, diffusers warns)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, cut = {}, {}
    ids["clip_l"], cut["CLIP-L"] = tokenizers.clip_l.encode(prompts, return_truncated=True)
    ids["clip_g"], cut["CLIP-G"] = tokenizers.clip_g.encode(prompts, return_truncated=True)
    if use_t5 and tokenizers.t5 is not None:
        ids["t5"], cut["T5"] = tokenizers.t5.encode(prompts, t5_tokens(tokenizers, convention, t5_length),
                                                    return_truncated=True)
    for row, prompt in enumerate(prompts):
        names = [f"{name} {ids['t5' if name == 'T5' else 'clip_l'].shape[1]}" for name in cut if cut[name][row]]
        if names:
            warnings.warn(f"prompt truncated to the token limits ({', '.join(names)}): {prompt[:40]!r}...",
                          stacklevel=2)
    return ids


# -- conditioning ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conditioning:
    context: np.ndarray  # (B, L, context_dim)
    pooled: np.ndarray  # (B, pooled_dim)
    neg_context: Optional[np.ndarray] = None  # None: no classifier-free guidance possible
    neg_pooled: Optional[np.ndarray] = None


def encode_text(model: Model, ids: dict, neg_ids: Optional[dict] = None, convention="keras",
                t5_length=None) -> Conditioning:
    """Token ids (``tokenize``) of the prompts and, for guidance, of the negative prompts → Conditioning.
    Without ``t5`` ids the convention's zero tokens stand in for T5 (under diffusers ``t5_length`` of them,
    its max_sequence_length). Prompts and negatives are encoded as one batch [pos; neg] (KerasHub's order),
    one call per encoder."""
    both = ids if neg_ids is None else {k: np.concatenate([ids[k], neg_ids[k]]) for k in ids}
    context, pooled = model.condition(both["clip_l"], both["clip_g"], both.get("t5"), convention, t5_length)
    if neg_ids is None:
        return Conditioning(context, pooled)
    B = len(ids["clip_l"])
    return Conditioning(context[:B], pooled[:B], context[B:], pooled[B:])


# -- the loop --------------------------------------------------------------------------------------------

def denoise(model: Model, latents, cond: Conditioning, sigmas, guidance, start=0, keep=None,
            on_step: Optional[Callable] = None):
    """Euler steps ``start`` .. N-1 of the N+1 ``sigmas`` from ``latents`` (B, h, w, C).

    guidance > 1 (with a negative conditioning) is classifier-free guidance, ``neg + g·(pos − neg)``,
    with one MMDiT call on the batch [pos; neg]; guidance ≤ 1 skips the unconditional pass, as KerasHub
    and diffusers do. diffusers batches [neg; pos]: the order changes nothing but rounding.
    ``keep`` = (mask (B, h, w, 1) bool, image latents, noise) inpaints: after each step the region where
    mask is False is reset to the image latents noised to the next sigma (the last sigma is 0: clean).
    ``on_step(k, latents)`` is called after the k-th step (k = 1, 2, ...)."""
    x = np.asarray(latents, model.dtype)
    guided = guidance > 1 and cond.neg_context is not None
    context = np.concatenate([cond.context, cond.neg_context]) if guided else cond.context
    pooled = np.concatenate([cond.pooled, cond.neg_pooled]) if guided else cond.pooled
    for i in range(start, len(sigmas) - 1):
        with trace.scope(f"step{i}"):
            trace.record("sigma", sigmas[i])
            t = np.full(len(context), sigmas[i] * model.config.num_train_timesteps, model.dtype)
            v = model.mmdit(np.concatenate([x, x]) if guided else x, t, context, pooled)
            if guided:
                pos, neg = np.split(v, 2)
                v = neg + float(guidance) * (pos - neg)
            x = scheduler.step(x, v, sigmas[i], sigmas[i + 1])
            if keep is not None:
                mask, image_latents, noise = keep
                x = np.where(mask, x, scheduler.add_noise(image_latents, noise, sigmas[i + 1]))
            trace.record("latents", x)
        if on_step is not None:
            on_step(i - start + 1, x)
    return x


# How each convention builds its schedule: KerasHub's own float32 operations (reproduced bit for bit);
# diffusers' float64 linspace on a float32 σ table (reproduced exactly); Stability's float32 torch schedule
# is not reproduced: the float64 one (≲ 1e-7 away).
SCHEDULES = {"keras": scheduler.keras_sigmas,
             "diffusers": functools.partial(scheduler.sigmas, table_dtype=np.float32),
             "sai": scheduler.sigmas}


def schedule_for(steps: int, shift: float, num_train_timesteps: int, convention="keras"):
    """The N+1 sigmas of a convention (``SCHEDULES``), as float64."""
    return SCHEDULES[convention](steps, shift, num_train_timesteps)


def schedule(model: Model, steps: int, convention="keras"):
    """The N+1 sigmas of ``model``'s scheduler config (``schedule_for``)."""
    return schedule_for(steps, model.config.shift, model.config.num_train_timesteps, convention)


def start_step(steps: int, strength: float, convention="keras") -> int:
    """The first step image-to-image and inpainting run. KerasHub and sd3_infer.py take int(N·(1 − strength)),
    diffusers int(N − min(N·strength, N)). They differ where N·(1 − strength) is a whole number that the
    floating-point product lands just below: 1 − 0.8 = 0.19999999999999996, so at strength 0.8 (the usual
    default) and N a multiple of 5 KerasHub starts one step earlier (N = 10: step 1, diffusers step 2);
    likewise 0.9 with N a multiple of 10, and rarer pairs (0.3 at N = 90, 0.55 at 60, ...)."""
    if convention == "diffusers":
        return int(steps - min(steps * strength, steps))
    return int(steps * (1 - strength))


def encode_image(model: Model, image, vae_eps=None):
    """image (B, H, W, 3) in [-1, 1] → diffusion latents: a VAE posterior sample with the given ε, or the
    mean when ``vae_eps`` is None or the VAE's ``sampler_method`` is "mode" (a KerasHub setting)."""
    mean, logvar = model.vae_encode(image)
    take_mean = vae_eps is None or model.config.vae.sampler_method == "mode"  # KerasHub's "mode" VAE
    z = mean if take_mean else vae.sample(mean, logvar, np.asarray(vae_eps, model.dtype))
    return vae.to_latent(z, model.config.vae)


def decode(model: Model, latents, shift=True):
    """Diffusion latents → image (B, H, W, 3), unclamped. ``shift=False`` decodes ``latents / scale``,
    as diffusers 0.42.1's inpaint pipeline does."""
    z = vae.from_latent(latents, model.config.vae) if shift else latents / model.config.vae.scale
    return model.vae_decode(z)


def latent_mask(mask, latent_shape, convention="keras"):
    """Image mask (B, H, W) → bool (B, h, w, 1), True = repaint, as each framework makes it:
    ``keras``      > 0.5, then a nearest resize that samples each cell's centre pixel (KerasHub);
    ``diffusers``  ≥ 0.5 (VaeImageProcessor.binarize), then torch's nearest interpolate, which samples each
                   cell's top-left pixel.
    Masks constant on 8×8 blocks with no value of exactly 0.5 give the same grid either way."""
    mask = np.asarray(mask)
    B, H, W = mask.shape
    h, w = latent_shape
    if convention == "diffusers":
        mask = mask >= 0.5
        rows, cols = np.arange(h) * H // h, np.arange(w) * W // w
    else:
        mask = mask > 0.5
        rows, cols = ((np.arange(h) + 0.5) * H / h).astype(int), ((np.arange(w) + 0.5) * W / w).astype(int)
    return mask[:, rows][:, :, cols][..., None]


def text_to_image(model: Model, cond: Conditioning, latents, steps: int, guidance: float, convention="keras",
                  on_step=None):
    """Initial latents (B, h, w, C) (standard normal) → image (B, 8h, 8w, 3)."""
    sigmas = schedule(model, steps, convention)
    return decode(model, denoise(model, latents, cond, sigmas, guidance, on_step=on_step))


def image_to_image(model: Model, cond: Conditioning, image, noise, steps: int, strength: float,
                   guidance: float, vae_eps=None, convention="keras", on_step=None):
    """image (B, H, W, 3) in [-1, 1], noise (B, H/8, W/8, C): encode, noise to σ_start, denoise, decode."""
    sigmas, start = schedule(model, steps, convention), start_step(steps, strength, convention)
    x = scheduler.add_noise(encode_image(model, image, vae_eps), np.asarray(noise, model.dtype), sigmas[start])
    return decode(model, denoise(model, x, cond, sigmas, guidance, start, on_step=on_step))


def inpaint(model: Model, cond: Conditioning, image, mask, noise, steps: int, strength: float,
            guidance: float, vae_eps=None, convention="keras", on_step=None):
    """As ``image_to_image``, repainting only where ``mask`` (B, H, W) is set (``latent_mask``: > 0.5 under
    keras, ≥ 0.5 under diffusers); elsewhere the result keeps
    the image latents. Under ``convention="diffusers"`` the result is decoded without the latent shift,
    as diffusers 0.42.1's StableDiffusion3InpaintPipeline does (docs/conventions.md)."""
    sigmas, start = schedule(model, steps, convention), start_step(steps, strength, convention)
    image_latents = encode_image(model, image, vae_eps)
    noise = np.asarray(noise, model.dtype)
    x = scheduler.add_noise(image_latents, noise, sigmas[start])
    keep = (latent_mask(mask, x.shape[1:3], convention), image_latents, noise)
    x = denoise(model, x, cond, sigmas, guidance, start, keep, on_step)
    return decode(model, x, shift=convention != "diffusers")


# -- output ----------------------------------------------------------------------------------------------

def to_uint8(image, rounding="keras"):
    """image (B, H, W, 3) in [-1, 1] → uint8, as each framework post-processes:
    ``keras``      round(clip((x + 1)/2, 0, 1)·255), in the image's dtype;
    ``diffusers``  ((x/2 + 0.5).clamp(0, 1) → float32)·255, rounded (``pt_to_numpy`` casts to float32
                   before ``numpy_to_pil`` multiplies);
    ``sai``        clip((x + 1)/2, 0, 1)·255 truncated (``astype(uint8)`` in sd3_infer.py).
    Rounding is half to even in all frameworks (numpy, torch)."""
    x = np.asarray(image)
    if rounding == "keras":
        return np.round(np.clip((x + 1) / 2, 0, 1) * 255).astype(np.uint8)
    if rounding == "diffusers":
        return np.round(np.clip(x / 2 + 0.5, 0, 1).astype(np.float32) * 255).astype(np.uint8)
    if rounding == "sai":
        return (np.clip((x + 1) / 2, 0, 1) * 255).astype(np.uint8)
    raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")


# -- prompts to image ------------------------------------------------------------------------------------

def check_size(model: Model, height: int, width: int) -> None:
    c = model.config
    unit = 8 * c.mmdit_patch_size  # VAE downsampling × patch size
    if height % unit or width % unit or height < unit or width < unit:
        raise PipelineError(f"width and height must be positive multiples of {unit} (8 × patch size "
                            f"{c.mmdit_patch_size}), got {width}x{height}")
    if max(height, width) > unit * c.mmdit_position_size:
        raise PipelineError(f"{width}x{height} exceeds this model's position table: at most "
                            f"{unit * c.mmdit_position_size} pixels a side")


def check_t5_tokenizer(model: Model, tokenizers: Tokenizers, use_t5=True) -> None:
    """T5 is never left out silently: a model with T5 needs a T5 tokenizer unless ``use_t5`` is False."""
    if use_t5 and model.config.t5 is not None and tokenizers.t5 is None:
        raise PipelineError("the weights hold T5 but no T5 tokenizer was loaded: pass T5's spiece.model, "
                            "vocabulary.spm or tokenizer.json (load_tokenizers(t5=...), --t5-tokenizer), "
                            "or run without T5 (use_t5=False, --no-t5)")


def check_components(model: Model) -> None:
    c = model.config
    need = {"clip_l": "text encoding", "clip_g": "text encoding", "vae": "decoding the latents"}
    missing = [f"{k} ({why})" for k, why in need.items() if getattr(c, k) is None]
    if missing:
        raise PipelineError("the weights have no " + ", no ".join(missing))


class _Silent:
    def update(self, n=1):
        pass

    def close(self):
        pass


def generate(model: Model, tokenizers: Tokenizers, prompts, negative_prompt="", *, height, width,
             steps=28, guidance=7.0, rng=None, convention="keras", use_t5=True, image=None, mask=None,
             strength=0.8, progress=None, t5_length=None):
    """Prompts → image (B, height, width, 3) in [-1, 1]: text-to-image, or image-to-image with ``image``
    (B or 1, height, width, 3) in [-1, 1], or inpainting with ``image`` and ``mask`` (B or 1, height, width).
    ``negative_prompt``: one for all prompts or one per prompt. ``t5_length``: the T5 token count
    (``t5_tokens``; diffusers' max_sequence_length, also its zero-token count without T5). A model with T5
    needs a T5 tokenizer unless ``use_t5=False``: T5 is never left out silently.
    ``rng`` (default ``numpy.random.default_rng(0)``) draws, in this order, float32 standard normals: the
    initial latents (text-to-image) or the noise then the VAE ε (the others), each (B, h, w, C).
    ``progress(stage, total)`` (e.g. ``tqdm(desc=stage, total=total)``) gets one bar per stage —
    "text", "denoise", "decode" — each advanced by ``update()`` and ended by ``close()``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise PipelineError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    check_t5_tokenizer(model, tokenizers, use_t5)
    check_components(model)
    check_size(model, height, width)
    if steps < 1:
        raise PipelineError(f"steps must be at least 1, got {steps}")
    if not guidance >= 0 or guidance == float("inf"):  # NaN fails the first test
        raise PipelineError(f"guidance must be a finite number ≥ 0, got {guidance}")
    if not 0 <= strength <= 1:
        raise PipelineError(f"strength must be in [0, 1], got {strength}")
    rng = np.random.default_rng(0) if rng is None else rng
    progress = progress or (lambda stage, total: _Silent())

    ids = tokenize(tokenizers, prompts, convention, use_t5, t5_length)  # before the bars: it may warn
    neg_ids = tokenize(tokenizers, negatives, convention, use_t5, t5_length) if guidance > 1 else None
    bar = progress("text", 1)
    cond = encode_text(model, ids, neg_ids, convention, t5_length)
    bar.update()
    bar.close()

    # The tasks decode right after their last step: the "decode" bar opens there.
    run = steps - (0 if image is None else start_step(steps, strength, convention))
    bars = [progress("denoise", run)] if run else [progress("decode", 1)]

    def on_step(k, latents):
        bars[-1].update()
        if k == run:
            bars[-1].close()
            bars.append(progress("decode", 1))

    shape = (len(prompts), height // 8, width // 8, model.config.latent_channels)
    if image is None:
        out = text_to_image(model, cond, rng.standard_normal(shape, np.float32), steps, guidance, convention,
                            on_step)
    else:
        image = np.broadcast_to(np.asarray(image, model.dtype), (len(prompts), height, width, 3))
        noise, vae_eps = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
        if mask is None:
            out = image_to_image(model, cond, image, noise, steps, strength, guidance, vae_eps, convention, on_step)
        else:
            mask = np.broadcast_to(np.asarray(mask), (len(prompts), height, width))
            out = inpaint(model, cond, image, mask, noise, steps, strength, guidance, vae_eps, convention, on_step)
    bars[-1].update()
    bars[-1].close()
    return out
