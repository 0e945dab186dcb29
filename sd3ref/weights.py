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
from converters.tensors import to_float32

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
        return to_float32(self.plan.read(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def component(self, prefix: str) -> dict[str, np.ndarray]:
        """All tensors under ``prefix`` with the prefix stripped (reads them all)."""
        return {n[len(prefix):]: self[n] for n in self.shapes if n.startswith(prefix)}


def load_weights(source: Union[str, Path], config: Optional[Union[SD3Config, str, Path]] = None
                 ) -> tuple[Weights, SD3Config]:
    """(weights, config) of ``source``. ``config`` overrides what the source records or implies:
    needed for a bare ``.weights.h5`` without a config.json beside it, and for Stability files of
    models whose heads are not 64 wide (the shapes cannot show the head count)."""
    plan = open_source(source, config)
    return Weights(plan), plan.config
