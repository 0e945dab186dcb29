"""End to end: one text-to-image run with T5-XXL, CLIP-L/G, the SD3-medium MMDiT and VAE, all from one random
float16 canonical file, with classifier-free guidance, per-stage wall time and the run's peak RSS.

    python -m bench.end_to_end [--size 256 --steps 28 --guidance 7 --convention diffusers] [--cache-gb 8] [--keep]

Writes the random canonical file once (one tensor in memory at a time; ~15.5 GB with T5, under --dir, deleted
at the end unless --keep), then runs the pipeline (``sd3ref.model.load`` → ``pipeline.encode_text`` →
``pipeline.text_to_image``) in a child process, so that the peak RSS is the run's own. Token ids are random
(no full-size tokenizer files offline): BOS, random ids, EOS, padding, for the prompt and an empty negative
prompt, at the convention's lengths (77 CLIP + 256 T5 tokens under diffusers and keras — KerasHub's
T5Preprocessor default; 77 + 77 under sai).
Baselines in the same run: the float32 matmul roofline (FLOP counts are the matmul work of each stage) and the
peak RSS of a child that only imports. The float16 → float32 upcast of the MMDiT's and T5's weights is timed
separately (one pass over each component, page cache warm) to give its share of a step / of the T5 stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from bench.common import matmul_gflops, random_canonical, rss_status
from bench.convert import full_size_config, t5_xxl, timed
from bench.mmdit import mmdit_flops
from bench.vae import decode_flops

CLIP_LENGTH = 77


# -- FLOPs (matmul work: linear layers and both attention products) ---------------------------------------

def clip_flops(c, batch, length=CLIP_LENGTH):
    per_token = 4 * c.hidden_dim**2 + 2 * c.hidden_dim * c.intermediate_dim
    return c.num_layers * (2 * batch * length * per_token + 4 * batch * length**2 * c.hidden_dim)


def t5_flops(c, batch, length):
    inner = c.num_heads * c.key_value_dim
    per_token = 4 * c.hidden_dim * inner + 3 * c.hidden_dim * c.intermediate_dim
    return c.num_layers * (2 * batch * length * per_token + 4 * batch * length**2 * inner)


# -- the child: one run -----------------------------------------------------------------------------------

def token_ids(config, batch, t5_length, rng, words=20):
    """Random prompt-like ids: BOS, ``words`` random ids, EOS, padding (CLIP: the last two ids of the
    vocabulary are BOS / EOS, as in CLIP's; T5: EOS 1, pad 0). ``words`` = 0 is the empty prompt."""
    ids = {}
    for name in ("clip_l", "clip_g"):
        v = getattr(config, name).vocabulary_size
        row = np.full((batch, CLIP_LENGTH), v - 1 if name == "clip_l" else 0, np.int32)  # pad: EOS / 0
        row[:, 0] = v - 2
        row[:, 1:1 + words] = rng.integers(0, v - 2, (batch, words))
        row[:, 1 + words] = v - 1
        ids[name] = row
    if t5_length:
        row = np.zeros((batch, t5_length), np.int32)
        row[:, :words] = rng.integers(2, 32000, (batch, words))
        row[:, words] = 1
        ids["t5"] = row
    return ids


def child(a):
    from converters import canonical
    from sd3ref import model as model_mod, nn, pipeline
    from sd3ref.weights import load_weights

    stages = []

    def stage(name, fn):
        def run(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            stages.append({"stage": name, "seconds": time.perf_counter() - t, **rss_status()})
            return out
        return run

    start = rss_status()
    t0 = time.perf_counter()
    loaded = model_mod.load(a.child, cache_gb=a.cache_gb)
    load_s = time.perf_counter() - t0

    class Timed(model_mod.Model):  # the same model; each component call is timed
        t5 = stage("T5-XXL", model_mod.Model.t5)
        clip_l = stage("CLIP-L", model_mod.Model.clip_l)
        clip_g = stage("CLIP-G", model_mod.Model.clip_g)
        mmdit = stage("MMDiT step", model_mod.Model.mmdit)
        vae_decode = stage("VAE decode", model_mod.Model.vae_decode)

    m = Timed(loaded.config, loaded.weights, loaded.dtype)
    rng = np.random.default_rng(0)
    t5_length = pipeline.T5_LENGTH[a.convention] or CLIP_LENGTH
    ids = token_ids(m.config, 1, t5_length, rng)
    neg = token_ids(m.config, 1, t5_length, rng, words=0)
    t_run = time.perf_counter()
    cond = pipeline.encode_text(m, ids, neg if a.guidance > 1 else None, a.convention)
    latents = rng.standard_normal((1, a.size // 8, a.size // 8, m.config.latent_channels), np.float32)
    image = pipeline.text_to_image(m, cond, latents, a.steps, a.guidance, a.convention)
    run_s = time.perf_counter() - t_run

    # The float16 → float32 upcast, one pass over each component's weights (what every step / T5 pays).
    upcast = {}
    file_weights = load_weights(a.child)[0]
    for comp in ("mmdit", "t5"):
        names = [n for n in file_weights if n.startswith(canonical.PREFIX[comp])]
        t = time.perf_counter()
        for n in names:  # from the file, not from the cache; into fresh arrays (nn.linear reuses a kept buffer)
            nn.upcast(file_weights[n], np.float32)
        upcast[comp] = time.perf_counter() - t
    with open(a.json, "w") as f:
        json.dump({"start": start, "load_s": load_s, "run_s": run_s, "stages": stages, "upcast_s": upcast,
                   "context_tokens": int(cond.context.shape[1]), "finite": bool(np.isfinite(image).all()),
                   "image_shape": list(image.shape), "end": rss_status()}, f)


# -- the parent -------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/sd3ref-bench-e2e")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--convention", default="diffusers", choices=("diffusers", "keras", "sai"))
    ap.add_argument("--cache-gb", type=float, default=0,
                    help="keep up to this many GB of the MMDiT's weights upcast to float32 across steps (default 0)")
    ap.add_argument("--keep", action="store_true", help="keep the random canonical file for the next run")
    ap.add_argument("--tiny", action="store_true", help="a small model (the smoke test)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: the run itself, on this file
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    if a.tiny:
        a.size, a.steps = min(a.size, 32), min(a.steps, 2)
        config = full_size_config(2, 64, 1, 16, clip_scale=64, t5=t5_xxl(scale=64, layers=2))
    else:
        config = full_size_config(t5=t5_xxl())

    from converters import canonical
    os.makedirs(a.dir, exist_ok=True)
    path = os.path.join(a.dir, "canonical_t5.safetensors" if not a.tiny else "tiny.safetensors")
    shapes = canonical.expected_shapes(config)
    need = sum(int(np.prod(s)) for s in shapes.values()) * 2
    existed = os.path.exists(path)
    if not existed and shutil.disk_usage(a.dir).free < need + (2 << 30):
        raise SystemExit(f"{a.dir}: {need / 1e9:.1f} GB needed, {shutil.disk_usage(a.dir).free / 1e9:.1f} GB free")
    t = time.perf_counter()
    random_canonical(config, path)
    print(f"{len(shapes)} tensors, {need // 2:,} parameters, {os.path.getsize(path) / 1e9:.2f} GB float16"
          f" ({'reused' if existed else f'written in {time.perf_counter() - t:.0f} s'})")

    roof = matmul_gflops()
    _, base = timed(["bench.end_to_end", "--help"])
    print(f"baseline: float32 matmul roofline {roof:.0f} GFLOP/s; child after imports, peak RSS {base:.2f} GB")

    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run.json")
            wall, peak = timed(["bench.end_to_end", "--child", path, "--json", out, "--size", str(a.size),
                                "--steps", str(a.steps), "--guidance", str(a.guidance),
                                "--convention", a.convention, "--cache-gb", str(a.cache_gb)])
            with open(out) as f:
                r = json.load(f)
    finally:
        if not a.keep:
            os.remove(path)

    guided = a.guidance > 1
    batch = 2 if guided else 1
    t5_len = r["context_tokens"] - CLIP_LENGTH
    flops = {"T5-XXL": t5_flops(config.t5, batch, t5_len), "CLIP-L": clip_flops(config.clip_l, batch),
             "CLIP-G": clip_flops(config.clip_g, batch),
             "MMDiT step": mmdit_flops(config, a.size, batch, r["context_tokens"]),
             "VAE decode": decode_flops(config.vae, a.size // 8)}
    st = r["stages"]
    mm = [s for s in st if s["stage"] == "MMDiT step"]
    times = [s["seconds"] for s in mm]
    total = r["run_s"]

    def row(label, seconds, gflop, s):
        frac = f"{gflop / seconds / roof:.0%}" if gflop else "–"
        print(f"| {label} | {seconds:.2f} | {seconds / total:.1%} | {gflop:,.0f} | {frac} | {s['rss_gb']:.2f} "
              f"| {s['peak_gb']:.2f} |")

    print(f"\n{a.size}×{a.size}, {a.steps} steps, guidance {a.guidance:g} (batch {batch}), {a.convention} convention:"
          f" {CLIP_LENGTH} + {t5_len} context tokens; MMDiT upcast cache {a.cache_gb:g} GB; image finite: {r['finite']}")
    print(f"\n| stage | wall s | share of run | GFLOP | roofline ({roof:.0f} GFLOP/s) | RSS after, GB | peak so far, GB |")
    print("|---|---|---|---|---|---|---|")
    for s in st:
        if s["stage"] != "MMDiT step":
            row(s["stage"], s["seconds"], flops[s["stage"]] / 1e9, s)
        elif s is mm[0]:
            row("MMDiT step 1", s["seconds"], flops["MMDiT step"] / 1e9, s)
        elif s is mm[-1]:
            rest = times[1:]
            row(f"MMDiT steps 2–{len(mm)} (median {np.median(rest):.2f}, "
                f"{min(rest):.2f}–{max(rest):.2f} s each)", sum(rest), flops["MMDiT step"] * len(rest) / 1e9, s)
    run_flops = sum(v for k, v in flops.items() if k != "MMDiT step") + flops["MMDiT step"] * len(mm)
    row("**run** (token ids → image)", total, run_flops / 1e9, st[-1])
    print(f"\nchild process: wall {wall:.1f} s (imports, load {r['load_s']:.2f} s, run {total:.1f} s, then the upcast "
          f"timing below), peak RSS {peak:.2f} GB ({peak - base:.2f} GB above the import baseline); "
          f"peak RSS at the end of the run {st[-1]['peak_gb']:.2f} GB")
    up = r["upcast_s"]
    print(f"float16 → float32 upcast, one pass: MMDiT {up['mmdit']:.2f} s = {up['mmdit'] / np.median(times):.1%} of a "
          f"median step; T5 {up['t5']:.2f} s = {up['t5'] / next(s['seconds'] for s in st if s['stage'] == 'T5-XXL'):.1%} of the T5 stage")


if __name__ == "__main__":
    sys.exit(main())
