"""sd3ref's trace file format, written by both reference tracers (golden.trace_diffusers, golden.trace_keras)
without importing sd3ref (like the generator) or the other framework."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent


def save(tensors: dict, path, metadata: dict) -> None:
    """sd3ref's trace format: one metadata key, JSON with the execution order (sd3ref.trace.save)."""
    from safetensors.numpy import save_file

    meta = {"sd3ref.trace": json.dumps({"order": list(tensors), **{k: str(v) for k, v in metadata.items()}})}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=meta)
