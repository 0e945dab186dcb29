"""Describe a model file or folder: detected format, components, dtypes, parameter counts, config.

    python -m converters.inspect FILE_OR_DIR [--config CONFIG]
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from . import canonical, cli
from .sources import open_source
from .tensors import dtype_name


def describe(plan) -> str:
    params, dtypes = Counter(), defaultdict(Counter)
    for name, shape in plan.shapes.items():
        comp = canonical.component_of(name)
        params[comp] += int(np.prod(shape, dtype=np.int64))
        dtypes[comp][dtype_name(plan.dtype(name))] += 1
    lines = [f"{plan.source}: {plan.format}, {len(plan.shapes)} tensors, {sum(params.values()):,} parameters"]
    for comp in plan.components():
        mix = ", ".join(f"{d} x{n}" for d, n in sorted(dtypes[comp].items()))
        lines.append(f"  {comp:7s} {sum(dtypes[comp].values()):5d} tensors {params[comp]:>16,} parameters  ({mix})")
    if canonical.CLIP_L_PROJECTION not in plan.shapes and plan.config.clip_l is not None:
        lines.append("  clip_l has no text_projection (identity)")
    for name, why in sorted(plan.dropped.items()):
        lines.append(f"  ignored {name}: {why}")
    lines.append("config: " + plan.config.to_json())
    return "\n".join(lines)


def run(argv=None) -> None:
    p = cli.parser("inspect", "Show the detected format, components, dtypes, parameter counts and config of a KerasHub "
                   "preset / .weights.h5, a diffusers folder, or a Stability / canonical safetensors file.")
    p.add_argument("source", metavar="FILE_OR_DIR")
    p.add_argument("--config", help="config file (KerasHub .weights.h5 without config.json, or to override inference)")
    a = p.parse_args(argv)
    print(describe(open_source(a.source, a.config)))


if __name__ == "__main__":
    cli.main(run)
