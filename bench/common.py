"""Shared benchmark helpers: the in-process baselines (matmul roofline, memory bandwidth), peak RSS,
random full-size SD3-medium configs and weights. Benchmarks never run in CI (a smoke test runs them tiny)."""

from __future__ import annotations

import glob
import os
import time

import numba
import numpy as np

from sd3ref.config import SD3Config


def sd3_medium(layers=24, hidden=1536, heads=24, position=192, context_dim=4096) -> SD3Config:
    """SD3-medium's MMDiT and VAE (the defaults); smaller values only for the smoke test."""
    return SD3Config(mmdit_hidden_dim=hidden, mmdit_num_layers=layers, mmdit_num_heads=heads,
                     mmdit_position_size=position, mmdit_context_dim=context_dim)


def tensor_init(shape, dtype, rng):
    """A random tensor scaled so activations stay finite through 24 blocks (NaN/inf would change timings)."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= 1.0 / np.sqrt(fan_in) if len(shape) > 1 else 0.02
    return a.astype(dtype, copy=False)


def random_weights(shapes: dict, dtype="float32", seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {n: tensor_init(s, dtype, rng) for n, s in shapes.items()}


def random_canonical(config: SD3Config, path: str, shapes: dict | None = None) -> dict:
    """A random float16 canonical file of ``shapes`` (default: every tensor of ``config``) at ``path``,
    written once (one tensor in memory at a time) and reused afterwards. Returns the shapes."""
    from converters import canonical
    from converters.tensors import write_safetensors

    shapes = canonical.expected_shapes(config) if shapes is None else shapes
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        entries = [(n, s, np.dtype(np.float16), lambda s=s: tensor_init(s, np.float16, rng)) for n, s in shapes.items()]
        with open(path + ".part", "wb") as f:
            write_safetensors(f, entries, {"sd3ref.format": canonical.FORMAT, "sd3ref.config": config.to_json()})
        os.replace(path + ".part", path)
    return shapes


def best_of(fn, repeat=3):
    """(best, all) wall times of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), times


def matmul_gflops(n=2048, dtype="float32", repeat=3) -> float:
    """The float32 BLAS roofline of this run: GFLOP/s of an n×n×n product, best of ``repeat``."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype)
    np.matmul(a, b, out=out)
    best, _ = best_of(lambda: np.matmul(a, b, out=out), repeat)
    return 2 * n**3 / best / 1e9


@numba.njit(parallel=True)
def _parallel_copy(a, b):
    for i in numba.prange(a.size):
        b[i] = a[i]


def _largest_cache_bytes(default=64 << 20) -> int:
    """The largest CPU cache of this machine as Linux reports it ("32768K"), else ``default``."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=default)


@numba.njit(parallel=True, fastmath=True)
def _parallel_sum(a):
    total = 0.0
    for i in numba.prange(a.size):
        total += a[i]
    return total


_SCRATCH = []


def cold_seconds(fn) -> float:
    """Wall time of one call of fn that starts with none of its data in the caches: a read of a scratch
    array twice the largest cache runs first. Bandwidth ratios need both sides cold: a copy of 17 MB timed
    right after another copy of the same arrays partly ran from the 32 MB L3 here (0.53-0.70 against
    0.81-0.83 ms cold, by hand), while the kernel it was compared with started cold. A read, not a copy:
    a copy would leave an L3 of dirty lines for the timed call to write back (a 17 MB copy 0.83-0.87 ms
    after a copying flush, 0.78-0.79 ms after a reading one, by hand)."""
    if not _SCRATCH:
        _SCRATCH.append(np.ones(2 * _largest_cache_bytes() // 4, np.float32))
    _parallel_sum(_SCRATCH[0])
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def copy_seconds(a, b) -> float:
    """One float32 copy of a into the existing array b (read + write), each started cold: the faster of
    NumPy's (one core) and a numba copy on all cores."""
    return min(cold_seconds(lambda: np.copyto(b, a)), cold_seconds(lambda: _parallel_copy(a, b)))


def copy_gbps(nbytes=256 << 20, repeat=5) -> float:
    """Memory bandwidth at this moment: GB/s moved (read + write) by a large float32 copy into an existing
    array, best of ``repeat``. It drifts here from one moment to the next (34-74 GB/s; the same two arrays
    59 then 35 GB/s, by hand), so ratios against it come from copies interleaved with the measured code."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    _parallel_copy(a, b)
    return 2 * nbytes / min(copy_seconds(a, b) for _ in range(repeat)) / 1e9


def rss_status() -> dict:
    """Current and peak resident set of this process, GiB (VmRSS / VmHWM of /proc/self/status, KiB);
    printed as "GB"."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = int(line.split()[1]) / 2**20
    return {"rss_gb": out["VmRSS"], "peak_gb": out["VmHWM"]}


def peak_rss_gb() -> float:
    """Peak resident set of this process so far, GiB; printed as "GB"."""
    return rss_status()["peak_gb"]


def spread(times) -> str:
    return f"{min(times):.3f}–{max(times):.3f} s (n={len(times)})"
