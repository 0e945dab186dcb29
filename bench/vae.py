"""VAE decode of one 64×64 latent to a 512×512 image with the full-size SD3 VAE (random float32 weights):
fast paths against plain NumPy, convolution FLOPs against the matmul roofline of the same run, peak RSS.

    python -m bench.vae            # --latent 8 --filters 64 for a tiny run
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench.common import best_of, matmul_gflops, peak_rss_gb, random_weights, spread
from converters import canonical
from sd3ref import nn, vae
from sd3ref.config import VAEConfig


def decoder_shapes(config: VAEConfig) -> dict:
    """The decoder's canonical tensor shapes (what a decode reads)."""
    return {k: v for k, v in canonical.vae_shapes(config).items() if ".decoder." in k}


def decode_flops(config: VAEConfig, latent: int) -> int:
    """Convolution and attention FLOPs of one decode (the matmul work; norms and adds excluded)."""
    f, side = 0, latent
    filters = config.decoder_num_filters
    conv = lambda i, o, k=3: 2 * side * side * i * o * k * k  # noqa: E731
    f += conv(config.latent_channels, filters[0])
    f += 2 * 2 * conv(filters[0], filters[0]) + 4 * conv(filters[0], filters[0], 1) + 4 * side**4 * filters[0]
    prev = filters[0]
    for i, c in enumerate(filters):
        for j in range(config.decoder_num_blocks[i]):
            f += conv(prev, c) + conv(c, c) + (conv(prev, c, 1) if prev != c else 0)
            prev = c
        if i < len(filters) - 1:
            side *= 2
            f += conv(c, c)
    return f + conv(prev, config.output_channels)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--filters", type=int, default=0, help="shrink every filter count to this (smoke test)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-plain", action="store_true")
    a = ap.parse_args(argv)
    config = VAEConfig() if not a.filters else VAEConfig(
        encoder_num_filters=(a.filters,) * 4, decoder_num_filters=(a.filters,) * 4, num_groups=a.filters // 4)
    roof = matmul_gflops()
    shapes = decoder_shapes(config)
    w = nn.Scope(random_weights(shapes), canonical.PREFIX["vae"])
    z = np.random.default_rng(1).standard_normal((1, a.latent, a.latent, config.latent_channels), dtype=np.float32)
    flops = decode_flops(config, a.latent)
    print(f"float32 matmul roofline {roof:.0f} GFLOP/s; decode {flops / 1e9:.0f} GFLOP")
    print("| impl | best s | spread | roofline | first call s |\n|---|---|---|---|---|")
    for fast in ([] if a.no_plain else [False]) + [True]:
        nn.use_kernels(fast)
        t0 = time.perf_counter()
        vae.decode(w, config, z)
        first = time.perf_counter() - t0
        best, times = best_of(lambda: vae.decode(w, config, z), a.repeat)
        print(f"| {'numba' if fast else 'numpy'} | {best:.2f} | {spread(times)} | {flops / best / 1e9 / roof:.0%} | "
              f"{first:.1f} |", flush=True)
    nn.use_kernels(True)
    weights_gb = sum(np.prod(s) for s in shapes.values()) * 4 / 2**30
    print(f"peak RSS {peak_rss_gb():.2f} GB (weights {weights_gb:.2f} GB)")


if __name__ == "__main__":
    sys.exit(main())
