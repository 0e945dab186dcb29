"""Peak RSS of one MMDiT forward (batch 2) from a float16 canonical file read through the memory map, fast
paths on. The random float16 file is written once under /tmp with the converters' streaming writer (never
committed); weights are upcast per layer, so only one layer's float32 copy is alive at a time.

    python -m bench.memory --size 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from bench.common import peak_rss_gb, random_canonical, sd3_medium
from bench.mmdit import inputs
from converters import canonical
from sd3ref import mmdit, nn
from sd3ref.weights import load_weights



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--file", default=None, help="default /tmp/sd3ref_bench_mmdit_fp16_L{layers}.safetensors")
    a = ap.parse_args(argv)
    config = dataclasses.replace(sd3_medium(layers=a.layers), vae=None)  # an MMDiT-only file
    path = a.file or f"/tmp/sd3ref_bench_mmdit_fp16_L{a.layers}.safetensors"
    random_canonical(config, path, canonical.mmdit_shapes(config))  # the MMDiT only
    weights, _ = load_weights(path, config=config)
    before = peak_rss_gb()
    t0 = time.perf_counter()
    out = mmdit.forward(nn.Scope(weights, canonical.PREFIX["mmdit"]), config, *inputs(config, a.size))
    print(json.dumps({"size": a.size, "seconds": time.perf_counter() - t0, "finite": bool(np.isfinite(out).all()),
                      "file_gb": os.path.getsize(path) / 2**30, "peak_rss_gb_before": before,
                      "peak_rss_gb": peak_rss_gb()}))


if __name__ == "__main__":
    sys.exit(main())
