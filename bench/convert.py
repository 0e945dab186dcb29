"""Converter throughput and memory on a full-size SD3-medium-shaped checkpoint (MMDiT, VAE, CLIP-L, CLIP-G,
no T5 — KerasHub's shipped preset), random float16 weights.

    python -m bench.convert [--dir /tmp/sd3ref-bench-convert]

Writes a random canonical file once (one tensor in memory at a time), then times, each in its own
process so that its peak RSS is its own: canonical → KerasHub preset (`converters.safetensors_to_keras`)
and that preset → canonical (`converters.keras_to_safetensors`). Baseline in the same run: copying the
canonical file (disk throughput). Peak RSS is compared with the largest tensor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import random_canonical, sd3_medium
from sd3ref.config import CLIPConfig, SD3Config, T5Config


def t5_xxl(scale=1, layers=24) -> T5Config:
    """SD3's T5-XXL v1.1 encoder (HF "gated-gelu" = tanh GELU); ``scale`` > 1 shrinks it (smoke test only)."""
    return T5Config(vocabulary_size=32128, hidden_dim=4096 // scale, num_layers=layers, num_heads=64 // scale,
                    intermediate_dim=10240 // scale, key_value_dim=64, activation="gelu_tanh")


def full_size_config(layers=24, hidden=1536, heads=24, position=192, clip_scale=1, t5=None) -> SD3Config:
    """SD3-medium with its two CLIP encoders and, given a ``t5`` config (``t5_xxl()``), T5; ``clip_scale`` > 1
    shrinks the CLIPs (smoke test only). The MMDiT's context width is T5's (4096 without T5)."""
    clip_l = CLIPConfig(vocabulary_size=49408 // clip_scale, hidden_dim=768 // clip_scale, num_layers=12,
                        num_heads=12, intermediate_dim=3072 // clip_scale, intermediate_activation="quick_gelu",
                        intermediate_output_index=10, final_layer_norm_epsilon=1e-6)
    clip_g = CLIPConfig(vocabulary_size=49408 // clip_scale, hidden_dim=1280 // clip_scale, num_layers=32,
                        num_heads=20, intermediate_dim=5120 // clip_scale, intermediate_activation="gelu",
                        intermediate_output_index=30, final_layer_norm_epsilon=1e-6)
    base = sd3_medium(layers, hidden, heads, position, context_dim=4096 if t5 is None else t5.hidden_dim)
    return SD3Config(**{**{f: getattr(base, f) for f in ("mmdit_hidden_dim", "mmdit_num_layers", "mmdit_num_heads",
                                                         "mmdit_position_size", "mmdit_context_dim", "vae")},
                        "mmdit_pooled_dim": clip_l.hidden_dim + clip_g.hidden_dim, "clip_l": clip_l, "clip_g": clip_g,
                        "t5": t5})



# Runs a module as `python -m` would, then writes the process's own peak RSS (VmHWM, KiB) to a file. Not
# wait4's ru_maxrss: a child started by vfork + exec is charged its parent's peak at the exec.
_RUN_AND_REPORT_PEAK = """
import runpy, sys
report, sys.argv = sys.argv[1], sys.argv[2:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as f, open(report, "w") as out:
        out.write(next(line for line in f if line.startswith("VmHWM:")).split()[1])
"""


def timed(args) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of ``python -m *args`` in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "peak")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _RUN_AND_REPORT_PEAK, report, *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.decode()[-500:]}")
        with open(report) as f:
            return wall, int(f.read()) / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/sd3ref-bench-convert")
    ap.add_argument("--tiny", action="store_true", help="a small model (the smoke test)")
    a = ap.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    config = full_size_config(2, 64, 1, 16, clip_scale=64) if a.tiny else full_size_config()
    canon = os.path.join(a.dir, "canonical.safetensors")
    shapes = random_canonical(config, canon)
    size = os.path.getsize(canon)
    largest = max(int(np.prod(s)) for s in shapes.values()) * 2  # float16
    print(f"{len(shapes)} tensors, {sum(int(np.prod(s)) for s in shapes.values()):,} parameters, "
          f"{size / 1e9:.2f} GB float16; largest tensor {largest / 1e6:.0f} MB")

    copy = os.path.join(a.dir, "copy.safetensors")
    t = time.perf_counter()
    shutil.copyfile(canon, copy)
    copy_s = time.perf_counter() - t
    os.remove(copy)
    print(f"baseline: file copy {copy_s:.1f} s, {size / copy_s / 1e9:.2f} GB/s")

    # What a converter process holds before it reads anything (interpreter, numpy, h5py, safetensors).
    _, base = timed(["converters.keras_to_safetensors", "--help"])
    print(f"baseline: converter process after imports, peak RSS {base:.2f} GB")

    preset, back = os.path.join(a.dir, "preset"), os.path.join(a.dir, "back.safetensors")
    print("| conversion | wall s | GB/s | × copy time | peak RSS GB | above imports, × largest tensor |")
    print("|---|---|---|---|---|---|")
    for label, args in (("canonical → KerasHub preset", ["converters.safetensors_to_keras", canon, "-o", preset, "--force"]),
                        ("KerasHub preset → canonical", ["converters.keras_to_safetensors", preset, "-o", back, "--force"])):
        wall, rss = timed(args)
        print(f"| {label} | {wall:.1f} | {size / wall / 1e9:.2f} | {wall / copy_s:.1f} | {rss:.2f} "
              f"| {(rss - base) * 2**30 / largest:.1f} |")
    shutil.rmtree(preset)
    os.remove(back)


if __name__ == "__main__":
    main()
