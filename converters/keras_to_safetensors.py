"""KerasHub preset folder or .weights.h5 -> canonical safetensors.

    python -m converters.keras_to_safetensors SRC -o OUT.safetensors [--config config.json]
        [--dtype keep|float16|bfloat16|float32] [--force]
"""

from __future__ import annotations

from . import cli
from .sources import open_keras


def run(argv=None) -> None:
    p = cli.parser("keras_to_safetensors", "Convert a KerasHub StableDiffusion3Backbone (preset folder, .weights.h5, or sharded "
                   "model.weights.json) to one canonical safetensors file (Stability single-file names).")
    p.add_argument("source", metavar="SRC", help="KerasHub preset folder or model.weights.h5")
    p.add_argument("--config", help="KerasHub config.json (default: the one in or next to SRC)")
    cli.add_dtype_arg(p)
    cli.add_output_args(p)
    a = p.parse_args(argv)
    plan = open_keras(a.source, a.config)
    cli.report_dropped(plan)
    print(cli.write_canonical(plan, a.output, a.dtype, a.force, "converters.keras_to_safetensors"))


if __name__ == "__main__":
    cli.main(run)
