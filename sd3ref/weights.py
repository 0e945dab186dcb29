"""Load SD3 weights from any supported source, in memory, under canonical names.

``load_weights(source)`` accepts a canonical or Stability single-file safetensors, a KerasHub preset
folder or bare ``.weights.h5``, or a diffusers pipeline folder. Every source goes through the
converters' mapping tables (``converters/*_layout.py``) and their checks; nothing is written.

The mapping is lazy: a tensor is read (memory-mapped for safetensors) and re-laid-out only when it is
accessed, and nothing is cached, so the caller decides what stays in memory. bfloat16 and float8
tensors are decoded to float32; float16 / float32 / float64 are returned as stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from converters.sources import ConversionError, Plan, open_source
from converters.tensors import BF16, to_float32

from . import nn
from .config import SD3Config

WeightsError = ConversionError


class Weights(Mapping):
    """Canonical name -> np.ndarray, computed on access. ``shapes`` and ``plan`` describe the source."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.shapes = dict(plan.shapes)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        a = self.plan.read(name)
        return nn.upcast(a, np.float32) if a.dtype == BF16 else to_float32(a)  # bfloat16 on all cores

    def __contains__(self, name) -> bool:
        # Mapping's default would read (and decode) the tensor just to answer: `"x.bias" in weights`
        # runs for every Linear call.
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class UpcastCache(Mapping):
    """``weights`` with the tensors under ``prefix`` kept upcast to ``dtype`` after their first read, up to
    ``max_bytes`` (first come, first kept; the rest are read and upcast on every access, as without a cache).

    For the MMDiT, which a generation run reads once per step: re-reading and upcasting its float16
    weights costs ~7% of a 256×256 step (median steps 7.99 s uncached, 7.42 s cached in two `python -m
    bench.end_to_end` runs, docs/performance.md; ~10% in the previous session's pair), and SD3-medium's MMDiT
    is 7.8 GiB in float32."""

    def __init__(self, weights: Mapping, prefix: str, dtype="float32", max_bytes: int = 0):
        self._weights, self._prefix, self._dtype, self._left = weights, prefix, np.dtype(dtype), max_bytes
        self._kept: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._kept:
            return self._kept[name]
        a = self._weights[name]
        if name.startswith(self._prefix) and a.size * self._dtype.itemsize <= self._left:
            # an owned copy either way (np.asarray would keep a float32 memory map as it is)
            a = self._kept[name] = nn.upcast(a, self._dtype) if a.dtype == np.float16 else np.array(a, self._dtype)
            self._left -= a.nbytes
        return a

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, name) -> bool:
        return name in self._weights


def load_weights(source: Union[str, Path], config: Optional[Union[SD3Config, str, Path]] = None,
                 encoders: Optional[dict] = None) -> tuple[Weights, SD3Config]:
    """(weights, config) of ``source``. ``config`` overrides what the source records or implies:
    needed for a bare ``.weights.h5`` without a config.json beside it, and for Stability files of
    models whose heads are not 64 wide (the shapes cannot show the head count). ``encoders``
    ({"clip_l" | "clip_g" | "t5": path}) adds Stability's separate text-encoder files to a single file."""
    plan = open_source(source, config, encoders)
    return Weights(plan), plan.config
