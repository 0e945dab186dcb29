"""sd3ref: a framework-free NumPy reference implementation of Stable Diffusion 3 / 3.5."""

import ctypes
import os

# OpenBLAS's idle workers spin for ~0.1 s after each multi-threaded product before they sleep; on 2 cores
# that spinning took a core from the numba kernels and the attention's threads that run between products
# (attention 112 → 143 ms right after a product, measured by hand). 4 is OpenBLAS's shortest timeout. OpenBLAS
# reads it when it loads, so this only takes effect when sd3ref is imported before NumPy (the CLI and
# the benchmarks are); otherwise set OPENBLAS_THREAD_TIMEOUT=4 in the environment. An existing value wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _reuse_freed_arrays(keep_bytes=1 << 30):
    """Have glibc serve large arrays from its heap and keep up to ``keep_bytes`` freed at its top, instead of
    one fresh mapping per array over 32 MiB (the MMDiT's MLP activations and joint q/k/v at 512², the VAE's
    feature maps): a fresh mapping's pages are zeroed on first touch, and with huge pages (NumPy asks for
    them) that can stall on compaction. Applies to arrays allocated on the main thread; other threads' arenas
    already keep arrays up to 64 MiB. ``python -m bench.allocator`` compares it with glibc's default in
    alternating processes: VAE decode at 512² 0.81-0.91× the time (docs/performance.md, "Allocation"). Freed
    memory inside the heap stays resident until reused. Leaves malloc alone when the environment
    sets the same options (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_`` or a GLIBC_TUNABLES malloc entry;
    ``MALLOC_MMAP_MAX_=65536`` restores glibc's default), when a library is preloaded (it may replace malloc,
    whose options glibc would then accept and ignore) and off glibc. Returns whether it applied."""
    set_outside = {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ)
    if set_outside or os.environ.get("LD_PRELOAD") or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")  # musl's mallopt ignores these options
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError, ValueError):
        return False
    if not glibc:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    # the trim threshold first: alone it changes nothing, so a failure of the second call leaves glibc as it was
    return mallopt(M_TRIM_THRESHOLD, keep_bytes) == 1 and mallopt(M_MMAP_MAX, 0) == 1


REUSES_FREED_ARRAYS = _reuse_freed_arrays()

from . import clip, conditioning, mmdit, nn, scheduler, t5, vae
from .config import CLIPConfig, SD3Config, T5Config, VAEConfig
from .model import Model, load

__all__ = ["load", "Model", "SD3Config", "CLIPConfig", "T5Config", "VAEConfig",
           "clip", "t5", "mmdit", "vae", "scheduler", "conditioning", "nn"]
