"""Canonical (or Stability) safetensors -> KerasHub preset folder.

    python -m converters.safetensors_to_keras CANON -o PRESET_DIR [--config CONFIG] [--force]

The folder holds config.json and model.weights.h5 in Keras' own layout (groups ``layers/...``,
datasets ``vars/N``, the layer ``name`` attribute on each ``vars`` group, bfloat16 as opaque |V2 with
attr dtype="bfloat16"), so ``StableDiffusion3Backbone.from_preset(PRESET_DIR)`` loads it. Groups of
weightless layers (inputs, activations) are not written: Keras skips them when loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sd3ref import config as cfgmod

from . import canonical, cli, keras_layout
from .sources import ConversionError, Plan, config_from_file, open_safetensors
from .tensors import F8_E4M3, atomic_output, cast, dtype_name, write_h5_dataset

PRESET_FILES = ("config.json", "model.weights.h5")  # what this command writes into the preset folder
KERAS_DTYPE = {"float16": "float16", "float32": "float32", "float64": "float64", "bfloat16": "bfloat16",
               "float8_e4m3fn": "float16"}


def component_dtypes(plan: Plan) -> dict:
    """Keras dtype policy per component: the stored dtype of the component's first tensor."""
    first = {}
    for name in plan.rules:
        first.setdefault(canonical.component_of(name), name)
    return {comp: KERAS_DTYPE[dtype_name(plan.dtype(name))] for comp, name in first.items()}


def _canonical_tensor(plan: Plan, name: str) -> np.ndarray:
    if name in plan.rules:
        return plan.read(name)
    # Only the CLIP-L projection may be absent (Stability files): KerasHub's default is the identity.
    if name != canonical.CLIP_L_PROJECTION:
        raise KeyError(name)
    like = plan.dtype(canonical.PREFIX["clip_l"] + "text_model.final_layer_norm.weight")
    return cast(np.eye(plan.config.clip_l.hidden_dim, dtype=np.float32), np.dtype(np.float16) if like == F8_E4M3 else like)


def write_h5(plan: Plan, path) -> list:
    import h5py

    written = []
    with h5py.File(path, "w") as f:
        f.create_group("vars").attrs["name"] = "stable_diffusion3_backbone"
        for comp in plan.components():
            table = keras_layout.table(plan.config, comp)
            for rule in table.rules:
                parts = rule.op.from_canonical(_canonical_tensor(plan, rule.canonical))
                for source, part in zip(rule.sources, parts):
                    group_path, index = source.rsplit("/", 1)
                    group = f.require_group(group_path)
                    group.attrs["name"] = table.names[group_path]
                    write_h5_dataset(group, index, part)
                    written.append((rule.canonical, part.shape, part.dtype))
    return written


def run(argv=None) -> None:
    p = cli.parser("safetensors_to_keras", "Convert a canonical (or Stability) safetensors file to a KerasHub preset folder "
                   "(config.json + model.weights.h5) that StableDiffusion3Backbone.from_preset loads.")
    p.add_argument("source", metavar="CANON", help="canonical safetensors file")
    p.add_argument("--config", help="config JSON when the file carries no sd3ref metadata")
    cli.add_output_args(p, "PRESET_DIR")
    a = p.parse_args(argv)
    plan = open_safetensors(a.source, config=config_from_file(a.config) if a.config else None)
    cli.report_dropped(plan)
    try:
        keras_config = cfgmod.to_keras(plan.config, component_dtypes(plan))
    except cfgmod.ConfigError as e:
        raise ConversionError(f"{a.source}: {e}") from None
    with atomic_output(Path(a.output), a.force, is_dir=True, inputs=plan.files(), writes=PRESET_FILES,
                       size=plan.nbytes()) as tmp:
        (tmp / "config.json").write_text(json.dumps(keras_config, indent=4))
        written = write_h5(plan, tmp / "model.weights.h5")
    print(cli.summarise("wrote KerasHub preset", written, a.output))


if __name__ == "__main__":
    cli.main(run)
