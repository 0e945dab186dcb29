"""Parity of every sd3ref component with the golden outputs of KerasHub and diffusers.

For each golden set, each weight source is loaded with ``sd3ref.weights.load_weights`` — with the config
of that source, so each framework is compared under its own conventions — and each component is run on
the framework's own inputs (its token ids, ``inputs.npz``) and compared with the framework's outputs:

    source      weights               reference outputs                          conditioning convention
    keras       <set>/keras/          keras_float32.npz                          keras
    diffusers   <set>/diffusers/      diffusers_float32.npz, diffusers_float64.npz   diffusers
    sai         <set>/sai.safetensors diffusers_float32.npz, diffusers_float64.npz   diffusers

Relative error = max|ours − theirs| / max|theirs|; it must stay ≤ 1e-5 in float32 and ≤ 1e-10 in float64.
float64 references come from torch only (KerasHub cannot compute in float64). The schedule is float64 by
design and is checked in every file: the float32 files hold float32-rounded sigmas; diffusers' float64 run
(float32 pins lifted, golden/README.md) matches the schedule built on its float32 σ table exactly.

The generation stages (``t2i``, ``i2i``, ``inpaint``) run ``sd3ref.pipeline`` on the framework's token ids and
injected noise: every step's latents and the decoded image to the same tolerances; the uint8 images, in
the framework's own rounding, in counts (``UINT8_TOLERANCE``); each task's first step over a grid of step
counts and strengths (``<task>/start_steps``, from the framework's own code), exactly. The diffusers files hold no ``t5/sequence``
(it is ``cond/context[:, 77:]``, see golden/README.md): that slice is the reference.

``tests/test_parity.py`` runs the same comparisons, through ``compare`` and ``set_rows``.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from . import conditioning, pipeline, scheduler, t5, vae
from .config import from_diffusers
from .model import Model

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
# uint8 images, in counts. A decoded value within float32 round-off of a rounding boundary (x.5 counts)
# may land on either side: in float32 one count; in float64 the error (~1e-15) is far below any such gap.
UINT8_TOLERANCE = {"float32": 1, "float64": 0}
# (source, reference file, dtype, convention)
RUNS = [
    ("keras", "keras_float32.npz", "float32", "keras"),
    ("diffusers", "diffusers_float32.npz", "float32", "diffusers"),
    ("diffusers", "diffusers_float64.npz", "float64", "diffusers"),
    ("sai", "diffusers_float32.npz", "float32", "diffusers"),
    ("sai", "diffusers_float64.npz", "float64", "diffusers"),
]
SOURCE_PATH = {"keras": "keras", "diffusers": "diffusers", "sai": "sai.safetensors"}


def compare(actual, expected, dtype, same_dtype=True) -> dict:
    """The one comparison used by ``verify`` and the tests: max abs, max rel, tolerance, PASS/FAIL.
    With ``same_dtype`` the result must also have been computed in ``dtype`` (no silent up/down-casts).
    uint8 references (images) are compared in counts: max_abs and the tolerance are counts."""
    computed = np.asarray(actual).dtype
    if np.asarray(expected).dtype == np.uint8:
        return _compare_uint8(actual, expected, dtype)
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    bad = (f"shape {actual.shape} vs {expected.shape}" if actual.shape != expected.shape else
           f"computed in {computed}" if same_dtype and computed != np.dtype(dtype) else None)
    if bad:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "tolerance": TOLERANCE[dtype],
                "status": f"FAIL ({bad})"}
    max_abs = float(np.abs(actual - expected).max())
    scale = float(np.abs(expected).max())
    max_rel = max_abs / scale if scale > 0 else max_abs
    ok = np.isfinite(actual).all() and max_rel <= TOLERANCE[dtype]
    return {"max_abs": max_abs, "max_rel": max_rel, "tolerance": TOLERANCE[dtype],
            "status": "PASS" if ok else "FAIL"}


def _compare_uint8(actual, expected, dtype) -> dict:
    actual, expected = np.asarray(actual), np.asarray(expected)
    tol = UINT8_TOLERANCE[dtype]
    if actual.shape != expected.shape or actual.dtype != np.uint8:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "tolerance": tol,
                "status": f"FAIL (shape {actual.shape} {actual.dtype} vs {expected.shape} uint8)"}
    counts = int(np.abs(actual.astype(np.int16) - expected.astype(np.int16)).max())
    return {"max_abs": float(counts), "max_rel": counts / 255, "tolerance": tol,
            "status": "PASS" if counts <= tol else "FAIL"}


def golden_sets(root=GOLDEN) -> list[str]:
    return sorted(p.parent.name for p in Path(root).glob("*/manifest.json"))


def load_npz(path) -> dict:
    """The arrays of an .npz file; a file that is not one is a FormatError naming it."""
    from converters.tensors import FormatError

    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy: one array, no names
            raise ValueError("a single array, not an archive of named arrays")
        with data as f:
            return {k: f[k] for k in f.files}
    except (ValueError, EOFError, zipfile.BadZipFile) as e:  # not an archive, truncated, object arrays
        why = "it holds object arrays" if "pickle" in str(e) else str(e).splitlines()[0]
        raise FormatError(f"{path}: not a NumPy .npz archive of numbers ({why})") from None


def _nhwc(x, reference_file):
    """diffusers stores images and latents NCHW (its native layout); sd3ref is NHWC."""
    nchw = reference_file.startswith("diffusers") and x.ndim == 4 and x.dtype != np.uint8  # uint8: NHWC
    return x.transpose(0, 2, 3, 1) if nchw else x


def outputs(model: Model, inputs: dict, ref: dict, convention: str, constants=None) -> dict:
    """sd3ref's value of every reference key it can compute, from the framework's own inputs; the
    generation stages too when the set's ``constants`` (manifest.json) are given."""
    out = {}
    enc = {}
    for kind in ("tokens", "neg_tokens"):
        if f"{kind}/clip_l" not in ref:
            continue
        ids = {k: ref[f"{kind}/{k}"] for k in ("clip_l", "clip_g", "t5") if f"{kind}/{k}" in ref}
        enc[kind] = {"clip_l": model.clip_l(ids["clip_l"]), "clip_g": model.clip_g(ids["clip_g"]),
                     "t5": model.t5(ids["t5"]) if "t5" in ids and model.config.t5 else None}
    if "tokens" in enc:
        e = enc["tokens"]
        for name in ("clip_l", "clip_g"):
            out.update({f"{name}/{k}": e[name][k] for k in ("intermediate", "sequence", "pooled")})
            eos = getattr(model.config, name).eos_token_id  # None: pooled at the largest id (KerasHub)
            if f"{name}/pooled_without_eos" in ref and eos is not None and constants is not None:
                ids = ref[f"tokens/{name}"]
                specials = (ids == eos) | (ids == ids[:, :1])  # EOS and the start token (golden/sets.py)
                out[f"{name}/pooled_without_eos"] = getattr(model, name)(
                    np.where(specials, constants["NO_EOS_ID"], ids))["pooled"]
        if e["t5"] is not None:
            out["t5/sequence"] = e["t5"]
    for key in ref:
        if key.startswith("t5/buckets_"):  # the middle row of a (2d + 3)² table
            n, d = map(int, key[len("t5/buckets_"):].split("_"))
            out[key] = t5.relative_position_buckets(2 * d + 3, n, d)[d + 1]
    for kind, prefix in (("tokens", ""), ("neg_tokens", "neg_")):
        if kind not in enc:
            continue
        e = enc[kind]
        ctx, out[f"cond/{prefix}pooled"] = conditioning.condition(e["clip_l"], e["clip_g"], e["t5"], convention,
                                                                  model.config.mmdit_context_dim)
        # The context needs the prompt's T5 ids whenever the model has a T5.
        if model.config.t5 is None or e["t5"] is not None:
            out[f"cond/{prefix}context"] = ctx

    out["mmdit/velocity"] = model.mmdit(inputs["mmdit/latents"], inputs["mmdit/timestep"],
                                        inputs["mmdit/context"], inputs["mmdit/pooled"])
    mean, logvar = model.vae_encode(inputs["vae/image"])
    out["vae/mean"], out["vae/logvar"] = mean, logvar
    out["vae/sample"] = vae.sample(mean, logvar, np.asarray(inputs["vae/eps"], model.dtype))
    out["vae/decoded"] = model.vae_decode(inputs["vae/z"])

    if constants is not None:
        out.update(pipeline_outputs(model, inputs, ref, convention, constants))

    for key in ref:
        if key.startswith("scheduler/sigmas_"):
            n, shift = key[len("scheduler/sigmas_n"):].split("_shift")
            s = pipeline.schedule_for(int(n), float(shift), model.config.num_train_timesteps, convention)
            out[key] = s
            out[f"scheduler/timesteps_n{n}_shift{shift}"] = scheduler.timesteps(s, model.config.num_train_timesteps)
    return out


def pipeline_outputs(model: Model, inputs: dict, ref: dict, convention: str, constants: dict) -> dict:
    """The three generation stages with the framework's token ids, noise and VAE ε (inputs.npz) and the
    set's constants (manifest.json: guidance, step counts, strength): the latents ``<stage>/latents_<k>``
    after the k-th step, the decoded image, and the uint8 image in the framework's own rounding."""
    ids = {k: ref[f"tokens/{k}"] for k in ("clip_l", "clip_g", "t5") if f"tokens/{k}" in ref}
    neg = {k: ref[f"neg_tokens/{k}"] for k in ids}
    cond = pipeline.encode_text(model, ids, neg, convention)
    rounding = "keras" if convention == "keras" else "diffusers"
    out = {}

    def stage(name, run):
        def record(k, latents):
            out[f"{name}/latents_{k}"] = latents
        out[f"{name}/decoded"] = run(record)
        out[f"{name}/image_uint8"] = pipeline.to_uint8(out[f"{name}/decoded"], rounding)

    g = constants["GUIDANCE"]
    stage("t2i", lambda rec: pipeline.text_to_image(model, cond, inputs["t2i/latents"], constants["T2I_STEPS"], g,
                                                          convention, rec))
    i2i = dict(image=inputs["i2i/image"], noise=inputs["i2i/noise"], steps=constants["I2I_STEPS"],
               strength=constants["I2I_STRENGTH"], guidance=g, vae_eps=inputs["i2i/vae_eps"], convention=convention)
    stage("i2i", lambda rec: pipeline.image_to_image(model, cond, **i2i, on_step=rec))
    stage("inpaint", lambda rec: pipeline.inpaint(model, cond, mask=inputs["inpaint/mask"], **i2i, on_step=rec))
    if "inpaint/pixel_mask" in inputs:  # a mask not constant on 8×8 blocks: the frameworks' mask conventions
        stage("inpaint_px", lambda rec: pipeline.inpaint(model, cond, mask=inputs["inpaint/pixel_mask"], **i2i,
                                                         on_step=rec))
    # Both tasks' first step over a grid of step counts and strengths, as each framework's own code computes it.
    table = np.array([[pipeline.start_step(n, s, convention) for s in constants["START_STEPS_STRENGTH"]]
                      for n in constants["START_STEPS_N"]])
    out["i2i/start_steps"] = out["inpaint/start_steps"] = table
    return out


def set_rows(set_dir, runs=RUNS) -> list[dict]:
    """Compare every component of one golden set for the given (source, file, dtype, convention) runs."""
    from .weights import load_weights

    set_dir = Path(set_dir)
    inputs = load_npz(set_dir / "inputs.npz")
    constants = json.loads((set_dir / "manifest.json").read_text())["constants"]
    rows = []
    loaded = {}
    for source, ref_file, dtype, convention in runs:
        if not (set_dir / ref_file).exists():
            continue
        if source not in loaded:
            # A Stability file records no config and its shapes cannot show head counts (the tiny golden
            # models' heads are not 64 wide), so it is read with the architecture of the diffusers folder.
            config = from_diffusers(set_dir / SOURCE_PATH["diffusers"]) if source == "sai" else None
            weights, config = load_weights(str(set_dir / SOURCE_PATH[source]), config)
            # Read once: the generation stages call the MMDiT dozens of times, and a lazy mapping re-reads
            # (and re-lays-out) every tensor on every access.
            loaded[source] = dict(weights), config
        weights, config = loaded[source]
        ref = load_npz(set_dir / ref_file)
        if "tokens/t5" in ref and "t5/sequence" not in ref:  # diffusers: stored once, inside the context
            ref["t5/sequence"] = ref["cond/context"][:, 77:]
        ours = outputs(Model(config, weights, dtype), inputs, ref, convention, constants=constants)
        for key in sorted(ours):
            if key in ref:
                row = {"set": set_dir.name, "component": key, "source": source, "dtype": dtype}
                # The schedule is float64 by design, whatever the compute dtype; integer references (start
                # steps, T5 buckets) have no compute dtype, and any difference in them fails (≥ 1 in ≤ 108).
                computed = not key.startswith("scheduler/") and np.issubdtype(ref[key].dtype, np.floating)
                row.update(compare(ours[key], _nhwc(ref[key], ref_file), dtype, same_dtype=computed))
                rows.append(row)
    return rows


def run(root=GOLDEN, sets=None) -> list[dict]:
    rows = []
    for name in sets or golden_sets(root):
        rows.extend(set_rows(Path(root) / name))
    return rows


def format_table(rows) -> str:
    head = f"{'set':<10} {'component':<34} {'source':<9} {'dtype':<7} {'max abs':>9} {'max rel':>9} {'tol':>7}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['set']:<10} {r['component']:<34} {r['source']:<9} {r['dtype']:<7} "
                     f"{r['max_abs']:9.2e} {r['max_rel']:9.2e} {r['tolerance']:7.0e}  {r['status']}")
    failed = sum(r["status"] != "PASS" for r in rows)
    lines.append(f"{len(rows)} comparisons, {failed} failed")
    return "\n".join(lines)


def main(args) -> int:
    sets = args.sets or golden_sets(args.golden)
    if not sets:
        # A wheel carries only the embedded model (golden/sd3/keras), not the fixtures with their outputs.
        print(f"error: no golden sets (*/manifest.json) under {args.golden}: the fixtures come with a source "
              "checkout of sd3ref; point --golden at its golden/ folder", file=sys.stderr)
        return 1
    unknown = [s for s in sets if not (Path(args.golden) / s / "manifest.json").is_file()]
    if unknown:
        print(f"error: {args.golden}: no golden set {', '.join(unknown)} (there: "
              f"{', '.join(golden_sets(args.golden)) or 'none'})", file=sys.stderr)
        return 1
    rows = run(args.golden, sets)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0 if rows and all(r["status"] == "PASS" for r in rows) else 1
