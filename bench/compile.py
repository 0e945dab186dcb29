"""numba compile and cache-load time: ``import sd3ref`` (numba and the kernels), then every kernel called once
on tiny float32 inputs, in a child process with an empty cache directory and again in one with the same, now
filled, directory (``cache=True`` on every kernel). The cache normally lives in sd3ref/__pycache__.

    python -m bench.compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


# The child times the import itself: bench/__init__ imports sd3ref, so it must come first.
_CHILD = """
import json, time
t = time.perf_counter()
import sd3ref
imported = time.perf_counter() - t
from bench.compile import first_calls
print(json.dumps({"import_s": imported, "first_calls_s": first_calls()}))
"""


def first_calls() -> float:
    import numpy as np

    from converters.tensors import BF16
    from sd3ref import kernels
    rng = np.random.default_rng(0)

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    t = time.perf_counter()
    x, img = f(2, 5, 8), f(1, 4, 4, 8)
    kernels.layer_norm(x, f(8), f(8))
    kernels.layer_norm_modulate(x, f(2, 1, 8), f(2, 1, 8), 1e-6)
    # RMSNorm compiles per row width: the MMDiT's 64-wide heads (q and k from the fused qkv), T5's 4096
    kernels.rms_norm(f(2, 5, 3, 2, 64)[:, :, :2], f(2, 1, 64))
    kernels.rms_norm(f(1, 2, 4096), f(4096))
    kernels.group_norm(img, 2, f(8), f(8))
    kernels.group_norm_silu(img, 2, f(8), f(8))
    kernels.gelu_tanh(f(3, 7))
    kernels.attention(f(1, 2, 5, 4), f(1, 2, 6, 4), f(1, 2, 6, 4), 0.5)
    kernels.attention(f(1, 2, 5, 4), f(1, 2, 6, 4), f(1, 2, 6, 4), 0.5, f(1, 2, 5, 6))
    kernels.conv2d(img, f(3, 8, 3, 3), f(3), 1, 1, 2)
    kernels.upcast(f(300, 300).astype(np.float16), np.float32)
    kernels.upcast(np.zeros((300, 300), np.uint16).view(BF16), np.float32)
    kernels.matmul_t(f(2, 8), f(5, 8))
    kernels.matmul_t(f(2, 8), f(5, 8).astype(np.float16))
    return time.perf_counter() - t


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        rows = []
        for label in ("empty cache (compile)", "filled cache (load)"):
            out = subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True, capture_output=True,
                                 text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
            rows.append((label, json.loads(out.strip().splitlines()[-1])))
    print("| numba cache | import sd3ref s | first call of every kernel (float32) s |\n|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['import_s']:.2f} | {r['first_calls_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
