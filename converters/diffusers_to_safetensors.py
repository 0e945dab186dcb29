"""diffusers StableDiffusion3Pipeline folder -> canonical safetensors.

    python -m converters.diffusers_to_safetensors DIR -o OUT.safetensors [--dtype ...] [--force]
"""

from __future__ import annotations

from . import cli
from .sources import open_diffusers


def run(argv=None) -> None:
    p = cli.parser("diffusers_to_safetensors", "Convert a diffusers SD3 pipeline folder (transformer/, vae/, text_encoder*/; sharded "
                   "files with index.json allowed) to one canonical safetensors file. Fuses q/k/v, swaps "
                   "the (scale, shift) halves back, restores LDM VAE names.")
    p.add_argument("source", metavar="DIR", help="diffusers save_pretrained folder")
    cli.add_dtype_arg(p)
    cli.add_output_args(p)
    a = p.parse_args(argv)
    plan = open_diffusers(a.source)
    cli.report_dropped(plan)
    print(cli.write_canonical(plan, a.output, a.dtype, a.force, "converters.diffusers_to_safetensors"))


if __name__ == "__main__":
    cli.main(run)
