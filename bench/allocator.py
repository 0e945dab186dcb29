"""What ``import sd3ref``'s allocator setting (large arrays from glibc's heap, sd3ref._reuse_freed_arrays) buys
against glibc's default: the same cases in child processes, alternately with the setting (the default) and
without it (``MALLOC_MMAP_MAX_=65536`` in the environment, which sd3ref leaves alone, so glibc runs as it
would). Alternating pairs, because this machine's speed drifts between processes.

Switching the setting inside one process is no substitute: any ``mallopt`` call freezes glibc's dynamic mmap
threshold, and the heap trimmed while the other setting runs starts the next run cold.

    python -m bench.allocator            # VAE decode to 512², GELU / GroupNorm+SiLU into fresh arrays
    python -m bench.allocator --mmdit    # and the SD3-medium MMDiT forward at 512² (8 GB of float32 weights)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from bench.common import peak_rss_gb, random_weights, sd3_medium
from bench.mmdit import inputs
from bench.vae import decoder_shapes
from converters import canonical
from sd3ref import kernels, mmdit, nn, vae
from sd3ref.config import VAEConfig


def cases(scale, with_mmdit):
    """name → a callable that runs the case once."""
    rng = np.random.default_rng(0)
    side = max(16, int(512 * scale))
    h = rng.standard_normal((2, max(1, int(1357 * scale)), 6144), dtype=np.float32)
    img = rng.standard_normal((1, side, side, 128), dtype=np.float32)
    ones, zeros = np.ones(128, np.float32), np.zeros(128, np.float32)
    config = VAEConfig()
    w = nn.Scope(random_weights(decoder_shapes(config)), canonical.PREFIX["vae"])
    z = rng.standard_normal((1, side // 8, side // 8, config.latent_channels), dtype=np.float32)
    out = {
        f"GELU into a fresh {h.nbytes / 1e6:.3g} MB array": lambda: kernels.gelu_tanh(h),
        f"GroupNorm+SiLU into a fresh {img.nbytes / 1e6:.3g} MB array": lambda: kernels.group_norm_silu(img, 32, ones, zeros),
        f"VAE decode to {side}×{side}": lambda: vae.decode(w, config, z),
    }
    if with_mmdit:
        cfg = sd3_medium()
        mw = nn.Scope(random_weights(canonical.mmdit_shapes(cfg)), canonical.PREFIX["mmdit"])
        args = inputs(cfg, side)
        out[f"MMDiT forward {side}×{side}, batch 2"] = lambda: mmdit.forward(mw, cfg, *args)
    return out


def child(a) -> None:
    """One process: every case once to warm up, then the best of ``repeat`` runs each; JSON on stdout."""
    import sd3ref

    best = {}
    for name, run in cases(a.scale, a.mmdit).items():
        run()
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        best[name] = min(times)
    print(json.dumps({"heap": sd3ref.REUSES_FREED_ARRAYS, "best_s": best, "peak_rss_gb": peak_rss_gb()}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--mmdit", action="store_true", help="also the SD3-medium MMDiT (8 GB of float32 weights)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrinks the image side (the smoke test)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return 0
    args = [sys.executable, "-m", "bench.allocator", "--child", "--scale", str(a.scale), "--repeat", str(a.repeat)]
    args += ["--mmdit"] if a.mmdit else []
    base = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    runs = {False: [], True: []}
    for _ in range(a.pairs):
        for heap in (False, True):
            env = base if heap else {**base, "MALLOC_MMAP_MAX_": "65536"}
            out = subprocess.run(args, env=env, check=True, capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
            runs[heap].append(json.loads(out.strip().splitlines()[-1]))
    if not all(r["heap"] for r in runs[True]):
        print("sd3ref's allocator setting did not apply here (not glibc, or LD_PRELOAD / GLIBC_TUNABLES set)")
    print(f"{a.pairs} alternating pairs of processes, glibc's default first; best of {a.repeat} runs per process")
    print("| case | glibc default s | sd3ref's heap setting s | heap / default, per pair |\n|---|---|---|---|")
    for name in runs[False][0]["best_s"]:
        d = [r["best_s"][name] for r in runs[False]]
        h = [r["best_s"][name] for r in runs[True]]
        ratios = " / ".join(f"{y / x:.2f}" for x, y in zip(d, h))
        print(f"| {name} | {min(d):.4f}–{max(d):.4f} | {min(h):.4f}–{max(h):.4f} | {ratios} |")
    peak = [max(r["peak_rss_gb"] for r in runs[heap]) for heap in (False, True)]
    print(f"peak RSS of a process: {peak[0]:.2f} GB default, {peak[1]:.2f} GB heap")
    return 0


if __name__ == "__main__":
    sys.exit(main())
