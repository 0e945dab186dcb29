"""Stability single file (+ separate text-encoder files) -> canonical safetensors.

    python -m converters.sai_to_safetensors FILE [--clip-l F] [--clip-g F] [--t5 F]
        [--config CONFIG] -o OUT.safetensors [--dtype ...] [--force]
"""

from __future__ import annotations

from . import cli
from .sources import config_from_file, open_safetensors


def run(argv=None) -> None:
    p = cli.parser("sai_to_safetensors", "Convert a Stability SD3 / SD3.5 single file, optionally with separate clip_l / clip_g / "
                   "t5xxl files (prefixed or not), to one canonical file. Known extra keys (logit_scale, "
                   "position_ids, tied T5 embed_tokens) are reported and dropped; float8 T5 is decoded.")
    p.add_argument("source", metavar="FILE", help="e.g. sd3.5_medium.safetensors")
    p.add_argument("--clip-l", metavar="F", help="separate CLIP-L file (text_encoders/clip_l.safetensors)")
    p.add_argument("--clip-g", metavar="F", help="separate CLIP-G file")
    p.add_argument("--t5", metavar="F", help="separate T5-XXL file (fp16 or fp8_e4m3fn)")
    p.add_argument("--config", help="KerasHub config.json or sd3ref config JSON; default: the file's "
                                    "sd3ref metadata, else inferred from shapes (64-wide heads)")
    cli.add_dtype_arg(p)
    cli.add_output_args(p)
    a = p.parse_args(argv)
    encoders = {c: f for c, f in (("clip_l", a.clip_l), ("clip_g", a.clip_g), ("t5", a.t5)) if f}
    plan = open_safetensors(a.source, encoders, config_from_file(a.config) if a.config else None)
    cli.report_dropped(plan)
    print(cli.write_canonical(plan, a.output, a.dtype, a.force, "converters.sai_to_safetensors"))


if __name__ == "__main__":
    cli.main(run)
