"""Regenerates golden/ from the reference frameworks. Run in the golden environment (golden/setup.sh):

    golden/.venv/bin/python -m golden.generate [--sets sd3,sd35,sd3_no_t5]

Every output here is computed by KerasHub or diffusers/transformers; sd3ref is never imported.
The run is deterministic: the same versions rewrite the same bytes."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import zipfile

import numpy as np
import torch

from golden import diffusers_side, keras_side, make_tokenizers, sai_file
from golden import sets as S
from golden.trace_format import versions

ROOT = os.path.dirname(os.path.abspath(__file__))
FIXED_DATE = "2026-01-01@00:00:00"
# Framework differences the cross-check cannot align, with their cause. These rows are reported but
# do not count towards max_rel_float.
KNOWN_DIFFERENCES = {
    "inpaint/decoded": "diffusers 0.42.1 StableDiffusion3InpaintPipeline decodes latents / scaling_factor and "
                       "omits + shift_factor (KerasHub, Stability and diffusers' text-to-image and image-to-image "
                       "pipelines add it); the final inpaint latents agree",
    "inpaint/image_uint8": "follows inpaint/decoded",
    "inpaint_px/latents_3": "a per-pixel mask: KerasHub binarises > 0.5 and samples each 8×8 cell's centre pixel, "
                            "diffusers binarises ≥ 0.5 and samples its top-left pixel (torch's nearest interpolate)",
    "inpaint_px/decoded": "follows inpaint_px/latents_3, and the decode shift of inpaint/decoded",
    "inpaint_px/image_uint8": "follows inpaint_px/decoded",
    "i2i/start_steps": "KerasHub takes int(N·(1 − strength)), diffusers int(N − min(N·strength, N)): one step apart "
                       "at float ties (strength 0.8 with N a multiple of 5, 0.9 with N a multiple of 10)",
    "inpaint/start_steps": "as i2i/start_steps",
}


# What computes the diffusers files: the pipelines, and transformers for what diffusers delegates to it.
DIFFUSERS_FRAMEWORK = ("diffusers (pipelines, MMDiT, VAE, scheduler); transformers (CLIP and T5 encoders and "
                       "tokenizers, clip_*/pooled_without_eos, t5/buckets_* from T5Attention._relative_position_bucket)")
KERAS_FRAMEWORK = "keras-hub (backbone, tasks' generate_step / generate(), preprocessor, scheduler)"


def save_npz(path: str, arrays: dict) -> None:
    """np.savez_compressed stamps the current time into the zip; this writes fixed timestamps."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def make_inputs(spec: dict) -> dict:
    rng = np.random.default_rng(spec["seed"])
    b, (height, width) = spec["batch"], spec["image"]
    h, w = height // 8, width // 8
    ctx_dim = spec["t5"]["hidden"] if spec["t5"] else 4096

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    # Image-space mask, constant on 8×8 blocks: nearest resizing to the latent grid then gives the same
    # result under torch's (floor) and JAX's (half-pixel) nearest conventions.
    blocks = (rng.random((b, h, w)) > 0.5).astype(np.float32)
    return {
        "mmdit/latents": normal(b, h, w, 16),
        # Unrounded σ·1000 values, as the sampler produces them.
        "mmdit/timestep": np.array([1000.0, 437.1234, 1.5, 987.3811][:b], np.float32),
        "mmdit/context": normal(b, S.MMDIT_CONTEXT_TOKENS, ctx_dim),
        "mmdit/pooled": normal(b, S.CLIP_L["hidden"] + S.CLIP_G["hidden"]),
        "vae/image": rng.uniform(-1, 1, (b, height, width, 3)).astype(np.float32),
        "vae/eps": normal(b, h, w, 16),
        "vae/z": normal(b, h, w, 16),
        "t2i/latents": normal(b, h, w, 16),
        "i2i/image": rng.uniform(-1, 1, (b, height, width, 3)).astype(np.float32),
        "i2i/vae_eps": normal(b, h, w, 16),
        "i2i/noise": normal(b, h, w, 16),
        "inpaint/mask": np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2),
        # Per pixel, in eighths (so some values are exactly 0.5): here the frameworks' mask conventions
        # differ (KerasHub > 0.5 at each cell's centre, diffusers ≥ 0.5 at its top-left pixel). A separate
        # generator, so that the inputs above stay as they were.
        "inpaint/pixel_mask": (np.random.default_rng(spec["seed"] + 1).integers(0, 9, (b, height, width)) / 8
                               ).astype(np.float32),
    }


def to_nhwc(key: str, x: np.ndarray) -> np.ndarray:
    """diffusers arrays are NCHW: every 4-D float array except the uint8 images."""
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 and not key.endswith("image_uint8") else x


def compare(reference: dict, other: dict, transpose: bool = False) -> dict:
    """max |a − b| / max |b| per common float key (b = reference), and max abs."""
    rows = {}
    for key in sorted(set(reference) & set(other)):
        a = np.asarray(other[key], np.float64)
        b = np.asarray(reference[key], np.float64)
        if transpose:
            a = to_nhwc(key, a)
        if a.shape != b.shape:
            rows[key] = {"error": f"shape {a.shape} vs {b.shape}"}
            continue
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        rows[key] = {"max_abs": diff, "max_rel": diff / scale if scale else diff}
    return rows


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: str) -> dict:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, folder)
            if rel != "manifest.json":
                out[rel] = {"sha256": _sha256(p), "bytes": os.path.getsize(p)}
    return dict(sorted(out.items()))


def _fix_keras_metadata(folder: str) -> None:
    # KerasHub stamps the save time into metadata.json; a fixed date keeps the fixtures reproducible.
    path = os.path.join(folder, "metadata.json")
    with open(path) as f:
        meta = json.load(f)
    meta["date_saved"] = FIXED_DATE
    with open(path, "w") as f:
        json.dump(meta, f, indent=4)


def validate_single_file(path: str, diffusers_dir: str, spec: dict, inputs: dict, reference: dict) -> dict:
    """Loads the single file with diffusers' own from_single_file and reruns every component."""
    from diffusers import StableDiffusion3Pipeline

    # Without T5, the absent components are passed explicitly (diffusers 0.42.1's inference of missing
    # optional components fails with "unsupported operand type(s) for -: 'set' and 'list'").
    extra = {"text_encoder_3": None, "tokenizer_3": None} if spec["t5"] is None else {}
    pipe = StableDiffusion3Pipeline.from_single_file(path, config=diffusers_dir, local_files_only=True,
                                                     torch_dtype=torch.float32, **extra)
    if spec["t5"] is not None:
        # diffusers 0.42's single-file T5 loader fills shared.weight but leaves the tied
        # encoder.embed_tokens on the meta device under transformers 5.x; re-tying restores the model.
        pipe.text_encoder_3.tie_weights()
    outputs = diffusers_side.run(pipe, spec, inputs, torch.float32)
    rows = compare(reference, outputs)
    worst = {k: r for k, r in rows.items() if r.get("max_abs", 1.0) != 0.0}
    return {
        "loader": "diffusers StableDiffusion3Pipeline.from_single_file(config=diffusers/)",
        "keys_compared": len(rows),
        "bit_identical": sorted(set(rows) - set(worst)) == sorted(rows),
        "differences": worst,
        "t5_tie_weights": "called after loading (diffusers 0.42 + transformers 5.24 leave the tied T5 "
                          "encoder.embed_tokens on the meta device)",
        "note": ("diffusers' single-file loader replaces a CLIP-L text_projection with the identity even when "
                 "the file holds one (single_file_utils.create_diffusers_clip_model_from_ldm), so every output "
                 "downstream of the CLIP-L pooled vector differs; all others must be bit-identical."),
    }


def generate_set(name: str, spec: dict, tok: dict) -> None:
    folder = os.path.join(ROOT, name)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    inputs = make_inputs(spec)
    save_npz(os.path.join(folder, "inputs.npz"), inputs)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    pipe = diffusers_side.build(spec, tok)
    diffusers_side.save_pretrained(pipe, os.path.join(folder, "diffusers"), spec["storage"])
    sai_path = os.path.join(folder, "sai.safetensors")
    sai_file.write(pipe, spec["mmdit"]["layers"], sai_path, spec["storage"])

    outputs = {"diffusers_float32": diffusers_side.run(pipe, spec, inputs, torch.float32)}
    diffusers_aligned = diffusers_side.run(pipe, spec, inputs, torch.float32, t5_length=S.KERAS_T5_LENGTH)
    outputs["diffusers_float64"] = diffusers_side.run(pipe, spec, inputs, torch.float64)
    pipe.to(torch.float32)

    # Auto-numbered layer names (written into the h5 `name` attributes) follow a fresh session's counters,
    # whatever was built before in this process.
    keras_side.keras.backend.clear_session()
    stored, preprocessor = keras_side.build(spec, tok, storage=spec["storage"])
    keras_side.assign_weights(stored, pipe)
    keras_dir = os.path.join(folder, "keras")
    keras_side.save_preset(stored, preprocessor, keras_dir)
    _fix_keras_metadata(keras_dir)
    del stored
    backbone, preprocessor = keras_side.build(spec, tok)
    keras_side.assign_weights(backbone, pipe)
    preset_check = keras_side.check_preset(keras_dir, backbone)
    outputs["keras_float32"] = keras_side.run(backbone, preprocessor, spec, inputs)
    keras_side.align_with_diffusers(backbone)
    keras_aligned = keras_side.run(backbone, preprocessor, spec, inputs)

    single_file = validate_single_file(sai_path, os.path.join(folder, "diffusers"), spec, inputs,
                                       outputs["diffusers_float32"])
    for key, arrays in outputs.items():
        if key.startswith("diffusers") and "t5/sequence" in arrays:
            # Size: diffusers' context is the T5 output appended unchanged after the 77 CLIP tokens, so
            # t5/sequence is stored once, as cond/context[:, 77:] (checked bit for bit here).
            assert np.array_equal(arrays["cond/context"][:, 77:], arrays["t5/sequence"])
            arrays = {k: v for k, v in arrays.items() if k != "t5/sequence"}
        save_npz(os.path.join(folder, f"{key}.npz"), arrays)
        outputs[key] = arrays

    cross = compare(keras_aligned, diffusers_aligned, transpose=True)
    f64_vs_f32 = compare(outputs["diffusers_float64"], outputs["diffusers_float32"])
    manifest = {
        "set": name,
        "generator": "python -m golden.generate (golden/generate.py)",
        "versions": versions(),
        "spec": spec,
        "constants": {k: getattr(S, k) for k in ("NEGATIVE_PROMPT", "GUIDANCE", "T2I_STEPS", "I2I_STEPS",
                                                 "I2I_STRENGTH", "KERAS_T5_LENGTH", "DIFFUSERS_T5_LENGTH",
                                                 "MMDIT_CONTEXT_TOKENS", "START_STEPS_N", "START_STEPS_STRENGTH",
                                                 "NO_EOS_ID", "T5_BUCKETS")},
        "sources": {
            "keras": "keras/ — KerasHub preset (preprocessor.save_to_preset + backbone.save_to_preset) of a "
                     "backbone built with the stored dtypes of spec.storage; metadata.json date_saved fixed to "
                     f"{FIXED_DATE}. The outputs come from a float32 KerasHub backbone holding the same values "
                     "(keras_preset_validation).",
            "diffusers": "diffusers/ — StableDiffusion3Pipeline.save_pretrained",
            "sai": "sai.safetensors — Stability single-file names, written from the diffusers tensors by "
                   "golden/sai_file.py, validated with diffusers' from_single_file (see single_file_validation)",
        },
        "weights": "diffusers/transformers initialisation (torch.manual_seed(spec.seed)) perturbed by golden."
                   "diffusers_side.perturb; KerasHub holds the same values (golden/keras_side.assign_weights).",
        "outputs": {
            "keras_float32.npz": {"framework": KERAS_FRAMEWORK, "dtype": "float32", "layout": "NHWC",
                                  "convention": "keras (77 CLIP + 77 T5 tokens, or + 77 zero tokens without T5); "
                                                "CLIP final LayerNorm eps 1e-6; T5 exact GELU"},
            "diffusers_float32.npz": {"framework": DIFFUSERS_FRAMEWORK, "dtype": "float32",
                                      "layout": "NCHW for 4-D float arrays (image_uint8 is NHWC)",
                                      "convention": "diffusers (77 CLIP + 256 T5 tokens, or + 256 zero tokens "
                                                    "without T5); CLIP final LayerNorm eps 1e-5; T5 tanh GELU"},
            "diffusers_float64.npz": {"framework": DIFFUSERS_FRAMEWORK, "dtype": "float64 (torch on CPU, with the "
                                      "float32 pins of diffusers_side.FLOAT32_PINS lifted)", "layout": "as diffusers_float32", "convention": "diffusers"},
        },
        "keys": {f"{k}.npz": {key: [list(v.shape), str(v.dtype)] for key, v in sorted(o.items())}
                 for k, o in outputs.items()},
        "cross_check": {
            "what": "KerasHub vs diffusers on the same weights and inputs, max |keras − diffusers| / max |diffusers| "
                    "(float32). Alignments: KerasHub CLIP final LN eps set to HF's 1e-5, KerasHub T5 GELU set "
                    "to tanh, diffusers T5 length (and zero-token count without T5) set to 77.",
            "rows": cross,
            "known_differences": KNOWN_DIFFERENCES,
            "max_rel_float": max((r["max_rel"] for k, r in cross.items() if "max_rel" in r
                                  and not k.startswith(("tokens", "neg_tokens")) and "uint8" not in k
                                  and k not in KNOWN_DIFFERENCES), default=0.0),
            "max_abs_uint8": max((r["max_abs"] for k, r in cross.items() if "uint8" in k and "max_abs" in r
                                  and k not in KNOWN_DIFFERENCES), default=0.0),
        },
        "diffusers_float64_vs_float32": f64_vs_f32,
        "single_file_validation": single_file,
        "keras_preset_validation": preset_check,
    }
    manifest["files"] = _files(folder)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False, default=float)
        f.write("\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(S.SETS), help="comma-separated set names")
    args = parser.parse_args(argv)
    tok_root = os.path.join(ROOT, "tokenizers")
    tok = make_tokenizers.write_all(tok_root)
    for name in args.sets.split(","):
        print(f"generating {name} ...", flush=True)
        generate_set(name, S.SETS[name], tok)
    try:
        from golden import tokenizer_corpus
    except ImportError:
        tokenizer_corpus = None
    if tokenizer_corpus is not None:
        tokenizer_corpus.build_corpus(tok["clip_dir"], tok["spiece"], os.path.join(tok_root, "corpus.json"))


if __name__ == "__main__":
    main()
