"""Fused elementwise kernels against the memory bandwidth, and attention against the plain NumPy path and
the matmul roofline, all measured in the same run. Sizes are those of the SD3-medium MMDiT at 512×512
(batch 2: 2×1024 image + 2×333 context tokens, hidden 1536, 24 heads) and of the VAE decoder's largest stage.

    python -m bench.kernels            # --scale 0.25 shrinks every size (the smoke test uses it)
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench.common import _parallel_copy, best_of, cold_seconds, copy_gbps, copy_seconds, matmul_gflops, peak_rss_gb
from sd3ref import kernels, nn


def _plain(fn, *args):
    nn.use_kernels(False)
    try:
        return fn(*args)
    finally:
        nn.use_kernels(True)


def _runtime_width(fn):
    """fn with RMSNorm's kernel compiled for any row width instead of the head width: the baseline of the
    per-width compilation."""
    def run(*args):
        compiled = kernels._compiled_width
        kernels._compiled_width = lambda d: 0
        try:
            return fn(*args)
        finally:
            kernels._compiled_width = compiled
    return run


def elementwise(scale, repeat):
    bw = copy_gbps()
    rng = np.random.default_rng(0)
    B, L, D = 2, max(1, int(1357 * scale)), 1536
    side = max(2, int(512 * scale))
    x = rng.standard_normal((B, L, D), dtype=np.float32)
    shift, sc = (rng.standard_normal((B, 1, D), dtype=np.float32) for _ in range(2))
    h = rng.standard_normal((B, L, 4 * D), dtype=np.float32)
    qkv = rng.standard_normal((B, L, 3, 24, 64), dtype=np.float32)
    img = rng.standard_normal((1, side, side, 128), dtype=np.float32)
    gw, gb = np.ones(128, np.float32), np.zeros(128, np.float32)
    h2, img2, qkv2 = h.copy(), img.copy(), qkv.copy()  # for the in-place cases
    qk = np.ascontiguousarray(qkv[:, :, :2])  # the same values without the fused projection's v rows between
    joint = np.empty_like(qkv)  # the joint attention's q, k, v, as the MMDiT allocates it per block
    cases = [  # name, output, fast, args, plain twin, bytes the op must move at least (reads + writes)
        ("layer_norm_modulate", "fresh", kernels.layer_norm_modulate, (x, shift, sc, 1e-6), nn.layer_norm_modulate,
         2 * x.nbytes),
        ("gelu_tanh", "fresh", kernels.gelu_tanh, (h,), nn.gelu_tanh, 2 * h.nbytes),
        ("gelu_tanh", "in place (MMDiT MLP)", lambda a: kernels.gelu_tanh(a, out=a), (h2,), nn.gelu_tanh, 2 * h.nbytes),
        ("rms_norm (q and k heads of the fused qkv)", "fresh", kernels.rms_norm,
         (qkv[:, :, :2], np.ones((2, 1, 64), np.float32), 1e-6), nn.rms_norm, 2 * (2 * qkv.nbytes // 3)),
        ("rms_norm (q and k heads, contiguous)", "fresh", kernels.rms_norm,
         (qk, np.ones((2, 1, 64), np.float32), 1e-6), nn.rms_norm, 2 * qk.nbytes),
        ("rms_norm (q and k heads of the fused qkv)", "into the joint sequence (MMDiT)",
         lambda *a: kernels.rms_norm(*a, out=joint[:, :, :2]), (qkv[:, :, :2], np.ones((2, 1, 64), np.float32), 1e-6),
         nn.rms_norm, 2 * (2 * qkv.nbytes // 3)),
        ("rms_norm, the width read at run time (as before session 6)", "into the joint sequence (MMDiT)",
         _runtime_width(lambda *a: kernels.rms_norm(*a, out=joint[:, :, :2])),
         (qkv[:, :, :2], np.ones((2, 1, 64), np.float32), 1e-6), nn.rms_norm, 2 * (2 * qkv.nbytes // 3)),
        ("rms_norm (q and k heads of the fused qkv)", "in place (SD3.5 attn2)",
         lambda *a: kernels.rms_norm(*a, out=a[0]), (qkv2[:, :, :2], np.ones((2, 1, 64), np.float32), 1e-6),
         nn.rms_norm, 2 * (2 * qkv.nbytes // 3)),
        ("group_norm_silu", "fresh", kernels.group_norm_silu, (img, 32, gw, gb, 1e-6), nn.group_norm_silu,
         3 * img.nbytes),
        ("group_norm_silu", "in place (VAE norm2)", lambda *a: kernels.group_norm_silu(*a, out=a[0]),
         (img2, 32, gw, gb, 1e-6), nn.group_norm_silu, 3 * img.nbytes),
    ]
    print(f"\nmemory bandwidth at the start (float32 copy into an existing array, read + write) {bw:.1f} GB/s; "
          f"numba threads {kernels.threads()}. Fractions are against a copy of the input's bytes timed "
          f"alternately with the kernel (the bandwidth drifts during a run), each call started with cold caches")
    print("| kernel | output | fast ms | spread | plain ms | speed-up | copy GB/s meanwhile | fraction of bandwidth | "
          "of the op's minimum traffic |\n|---|---|---|---|---|---|---|---|---|")
    src = np.ones(max(case[3][0].nbytes for case in cases) // 4, np.float32)
    dst = np.empty_like(src)
    _parallel_copy(src, dst)
    for name, output, fast, args, twin, minimum in cases:
        once = 2 * args[0].nbytes  # one read of the input (a view's own bytes) + one write of the output
        a, b = src[:args[0].nbytes // 4], dst[:args[0].nbytes // 4]
        fast(*args)  # compile / load the cache
        times, copies = [], []
        for _ in range(repeat):
            times.append(cold_seconds(lambda: fast(*args)))
            copies.append(copy_seconds(a, b))
        t, c = min(times), min(copies)
        tp, _ = best_of(lambda: _plain(twin, *args), max(1, repeat // 2))
        print(f"| {name} | {output} | {t * 1e3:.1f} | {min(times) * 1e3:.1f}–{max(times) * 1e3:.1f} | {tp * 1e3:.1f} | "
              f"{tp / t:.1f}× | {once / c / 1e9:.0f} | {c / t:.0%} | {c / t * minimum / once:.0%} |", flush=True)


def attention(scale, repeat, plain_max_tokens=1400):
    roof = matmul_gflops()
    rng = np.random.default_rng(0)
    print(f"\nfloat32 matmul roofline {roof:.0f} GFLOP/s; attention budget {kernels.ATTENTION_BUDGET >> 20} MiB "
          f"of logits per block and thread, {kernels.threads()} threads")
    print("| image | tokens | fast s | spread | plain s | speed-up | roofline | extra MiB fast / plain logits |")
    print("|---|---|---|---|---|---|---|---|")
    for image in (256, 512, 1024):
        L = max(2, int(((image // 16) ** 2 + 333) * scale))
        q, k, v = (rng.standard_normal((2, 24, L, 64), dtype=np.float32) for _ in range(3))
        kernels.attention(q, k, v, 0.125)
        t, times = best_of(lambda: kernels.attention(q, k, v, 0.125), repeat)
        flops = 4 * 2 * 24 * L * L * 64
        workers = min(kernels.threads(), 2 * 24)  # one logits block per attention thread
        block = min(L, kernels.ATTENTION_BUDGET // (4 * L))
        if L <= plain_max_tokens:  # the plain path's (2, 24, L, L) logits are 3.5 GiB at 1024×1024
            tp, _ = best_of(lambda: _plain(nn.attention, q, k, v, 0.125), 1)
            plain = f"{tp:.3f} | {tp / t:.1f}×"
        else:
            plain = "not run | –"
        print(f"| {image} | {L} | {t:.3f} | {min(times):.3f}–{max(times):.3f} | {plain} | "
              f"{flops / t / 1e9 / roof:.0%} | {workers * block * L * 4 / 2**20:.1f} / {2 * 24 * L * L * 4 / 2**20:.0f} |",
              flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=9)
    a = ap.parse_args(argv)
    elementwise(a.scale, a.repeat)
    attention(a.scale, max(1, a.repeat // 2))
    print(f"\npeak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    sys.exit(main())
