"""sd3ref's trace file format, written by both reference tracers (golden.trace_diffusers, golden.trace_keras)
without importing sd3ref (like the generator) or the other framework; and the framework versions every
golden file records."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent
FRAMEWORKS = ("keras", "keras-hub", "jax", "numpy", "torch", "diffusers", "transformers", "tokenizers",
              "safetensors", "h5py", "sentencepiece")


def versions() -> dict:
    """The installed versions of FRAMEWORKS (those present) and Python."""
    v = {}
    for name in FRAMEWORKS:
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    v["python"] = platform.python_version()
    return v


def save(tensors: dict, path, metadata: dict) -> None:
    """sd3ref's trace format: one metadata key, JSON with the execution order (sd3ref.trace.save), and the
    versions of the frameworks that produced it."""
    from safetensors.numpy import save_file

    fields = {k: str(v) for k, v in metadata.items()}
    meta = {"sd3ref.trace": json.dumps({"order": list(tensors), **fields, "versions": json.dumps(versions())})}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=meta)
