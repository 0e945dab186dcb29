"""MMDiT forward, full-size SD3-medium with random float32 weights, batch 2 (CFG), against the matmul
roofline measured in the same run, plain NumPy and the numba fast paths, optionally diffusers/torch in a
subprocess (``--torch-python``, e.g. golden/.venv/bin/python from golden/setup.sh; torch is never a runtime
dependency).

    python -m bench.mmdit --size 512 256 --torch-python golden/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import best_of, matmul_gflops, peak_rss_gb, random_weights, sd3_medium, spread
from converters import canonical
from sd3ref import mmdit, nn

CONTEXT_TOKENS = 333  # 77 CLIP + 256 T5


def mmdit_flops(config, size, batch=2, context=CONTEXT_TOKENS):
    """Matmul FLOPs of one forward (linear layers and both attention products; elementwise work excluded)."""
    D, p, C = config.mmdit_hidden_dim, config.mmdit_patch_size, config.latent_channels
    n = (size // 8 // p) ** 2
    L = n + context
    mlp = int(D * config.mmdit_mlp_ratio)
    per_stream = 3 * D * D + D * D + 2 * D * mlp  # qkv, proj, fc1 + fc2
    f = 0
    for i in range(config.mmdit_num_layers):
        ctx = 3 * D * D if i == config.mmdit_num_layers - 1 else per_stream
        f += 2 * batch * (n * per_stream + context * ctx) + 4 * batch * L * L * D
    f += 2 * batch * (n * (C * p * p * D + D * p * p * C) + context * config.mmdit_context_dim * D)
    return f


def inputs(config, size, batch=2, context=CONTEXT_TOKENS, seed=1):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, size // 8, size // 8, config.latent_channels), dtype=np.float32)
    ctx = rng.standard_normal((batch, context, config.mmdit_context_dim), dtype=np.float32)
    pooled = rng.standard_normal((batch, config.mmdit_pooled_dim), dtype=np.float32)
    return latents, np.full((batch,), 500.0, np.float32), ctx, pooled


def run(sizes, repeat, config, torch_python=None, plain=True):
    roof = matmul_gflops()
    print(f"float32 matmul roofline {roof:.0f} GFLOP/s")
    weights = random_weights(canonical.mmdit_shapes(config))
    w = nn.Scope(weights, canonical.PREFIX["mmdit"])
    rows = []
    for size in sizes:
        args = inputs(config, size)
        flops = mmdit_flops(config, size)
        modes = ([False] if plain else []) + [True]
        for fast in modes:
            nn.use_kernels(fast)
            t0 = time.perf_counter()
            mmdit.forward(w, config, *args)  # warm-up (numba compile or cache load)
            first = time.perf_counter() - t0
            best, times = best_of(lambda: mmdit.forward(w, config, *args), repeat)
            rows.append(dict(size=size, impl="numba" if fast else "numpy", seconds=best, spread=spread(times),
                             first_call=first, roofline_fraction=flops / best / 1e9 / roof))
            print(json.dumps(rows[-1]), flush=True)
    nn.use_kernels(True)
    weights = w = None  # freed before torch loads its own copy
    if torch_python:
        for size in sizes:
            # By path, so that the torch interpreter needs none of sd3ref's dependencies (bench/__init__ imports
            # sd3ref); -P keeps bench/ off sys.path, where its modules would shadow the ones diffusers imports.
            out = subprocess.run([torch_python, "-P", str(Path(__file__).with_name("torch_mmdit.py")), str(size), str(repeat),
                                  json.dumps(config.to_dict())], capture_output=True, text=True, check=True)
            t = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(dict(size=size, impl="torch", seconds=t["best"], spread=spread(t["times"]),
                             peak_rss_gb=t["peak_rss_gb"],
                             roofline_fraction=mmdit_flops(config, size) / t["best"] / 1e9 / roof))
            print(json.dumps(rows[-1]), flush=True)
    print(f"peak RSS {peak_rss_gb():.2f} GB (random float32 weights in memory)")
    return roof, rows


def table(roof, rows):
    print(f"\n| size | impl | best s | spread | × torch | roofline ({roof:.0f} GFLOP/s) | first call s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        torch = next((t["seconds"] for t in rows if t["impl"] == "torch" and t["size"] == r["size"]), None)
        ratio = f"{r['seconds'] / torch:.2f}" if torch else "–"
        first = f"{r['first_call']:.1f}" if "first_call" in r else "–"
        print(f"| {r['size']} | {r['impl']} | {r['seconds']:.2f} | {r['spread']} | {ratio} | "
              f"{r['roofline_fraction']:.0%} | {first} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--no-plain", action="store_true", help="skip the plain NumPy baseline")
    ap.add_argument("--torch-python", help="a Python with torch + diffusers to time SD3Transformer2DModel")
    a = ap.parse_args(argv)
    table(*run(a.size, a.repeat, sd3_medium(layers=a.layers), a.torch_python, plain=not a.no_plain))


if __name__ == "__main__":
    sys.exit(main())
