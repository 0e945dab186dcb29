"""sd3ref: a framework-free NumPy reference implementation of Stable Diffusion 3 / 3.5."""

import os

# OpenBLAS's idle workers spin for ~0.1 s after each multi-threaded product before they sleep; on 2 cores
# that spinning took a core from the numba kernels and the attention's threads that run between products
# (attention 112 → 143 ms right after a product, measured by hand). 4 is OpenBLAS's shortest timeout. OpenBLAS
# reads it when it loads, so this only takes effect when sd3ref is imported before NumPy (the CLI and
# the benchmarks are); otherwise set OPENBLAS_THREAD_TIMEOUT=4 in the environment. An existing value wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import clip, conditioning, mmdit, nn, scheduler, t5, vae
from .config import CLIPConfig, SD3Config, T5Config, VAEConfig
from .model import Model, load

__all__ = ["load", "Model", "SD3Config", "CLIPConfig", "T5Config", "VAEConfig",
           "clip", "t5", "mmdit", "vae", "scheduler", "conditioning", "nn"]
